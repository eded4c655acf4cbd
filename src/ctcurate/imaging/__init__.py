"""CT volumes: series assembly, resampling grids, lung masks."""
