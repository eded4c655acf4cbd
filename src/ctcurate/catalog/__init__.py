"""The archive catalog built by ``index``: scanning, sites, tables and the DuckDB views."""
