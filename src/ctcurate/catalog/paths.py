"""Where a series' files are: relative instance paths from the index's ``instances`` table."""

from __future__ import annotations

from pathlib import Path

from ctcurate.io.shards import read_shards


def series_paths(instances: Path) -> dict[tuple[str, str], list[str]]:
    """(site, series uid) → sorted relative instance paths, from the index's sharded
    ``instances`` table (a folder of Parquet shards)."""
    table = read_shards(instances, columns=["path", "site", "series_instance_uid"])
    out: dict[tuple[str, str], list[str]] = {}
    for row in table.to_pylist():
        if row["site"] is None or row["series_instance_uid"] is None:
            continue
        out.setdefault((str(row["site"]), str(row["series_instance_uid"])), []).append(
            str(row["path"])
        )
    return {k: sorted(v) for k, v in sorted(out.items())}
