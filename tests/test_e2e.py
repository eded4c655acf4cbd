"""End to end: `dvc repro` of the whole pipeline on a tiny archive in a copy of the project.

Every test shares one build (``demo_build`` in conftest.py, ``helpers.demo``): the archive
carries a canary in one pneumonia study's headers and file names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.demo import BIN, CANARY, DemoBuild

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # `-m "not slow"` leaves them out too


def test_dvc_repro_builds_a_verified_release(demo_build: DemoBuild) -> None:
    proj = demo_build.proj
    # DuckDB writes a random id into the catalog: DVC must not hash it (.dvcignore)
    demo_build.run("dvc", "check-ignore", "data/index/catalog.duckdb")

    index_report = json.loads((proj / "data/index/report.json").read_text())
    assert index_report["files_seen"] == (
        index_report["files_indexed"]
        + index_report["files_quarantined"]
        + index_report["files_skipped"]
    )
    assert index_report["files_quarantined"] > 0  # the archive's broken files

    manifest = json.loads((proj / "data/release/manifest.json").read_text())
    assert len(manifest["cases"]) > 0
    assert {"train", "test"} <= set(manifest["splits"])
    verified = demo_build.run(str(BIN / "ctcurate"), "verify", "data/release")
    assert manifest["release_id"][:16] in verified.stdout

    metrics = json.loads((proj / "metrics/eval.json").read_text())
    for key in ("lung_dice", "typicality_accuracy", "n_test"):
        assert key in metrics
    shown = demo_build.run("dvc", "metrics", "show", "--json")
    assert "lung_dice" in shown.stdout


def test_unchanged_project_reruns_only_the_snapshot(demo_build: DemoBuild) -> None:
    """Nothing changed: only the (always-run) snapshot runs, nothing downstream of it."""
    again = demo_build.run("dvc", "repro")
    ran = [line for line in again.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'snapshot':"], again.stdout


def test_forced_rebuild_gives_the_same_release(demo_build: DemoBuild) -> None:
    """Every stage from the archive's snapshot to the release, forced: the same release.

    The archive stays as built (``synth`` frozen: a regenerated one would lack the canary;
    ``test_synth`` checks that the generator is deterministic)."""
    proj = demo_build.proj
    manifest = json.loads((proj / "data/release/manifest.json").read_text())
    demo_build.run("dvc", "freeze", "synth")
    try:
        forced = demo_build.run("dvc", "repro", "-f", "pack")
    finally:
        demo_build.run("dvc", "unfreeze", "synth")
    ran = [line for line in forced.stdout.splitlines() if line.startswith("Running stage")]
    assert "Running stage 'index':" in ran
    assert ran[-1] == "Running stage 'pack':", forced.stdout
    rebuilt = json.loads((proj / "data/release/manifest.json").read_text())
    assert rebuilt["release_id"] == manifest["release_id"]


# --- canary: header text and file names never leave the archive's catalog ------------------

#: Outputs allowed to hold archive text: the archive, its listing (file names) and the index
#: catalog (paths, series descriptions, kernels), which the rules query.
CATALOG = ("data/synth", "data/snapshot", "data/index")
#: Tables that keep the archive's patient id (PCR results are linked by it, splits group by
#: it) in this column only.
PATIENT_TABLES = ("data/select/", "data/cases/")


def _text_of(path: Path, drop: tuple[str, ...] = ()) -> str:
    """What a reader of ``path`` sees: Parquet values (less the columns in ``drop``) and
    HDF5 names and attributes decoded (their pages may be compressed), any other file's
    bytes as they are."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        table = table.drop_columns([c for c in drop if c in table.column_names])
        return str(table.to_pylist()) + str(pq.read_metadata(path).metadata)
    if path.suffix in {".h5", ".hdf5"}:
        import h5py

        seen: list[str] = []
        with h5py.File(path, "r") as f:

            def visit(name: str, obj: object) -> None:
                seen.append(name)
                seen.extend(f"{k}={v!r}" for k, v in getattr(obj, "attrs", {}).items())
                if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "SOU":
                    seen.append(repr(obj[()]))

            seen.extend(f"{k}={v!r}" for k, v in f.attrs.items())
            f.visititems(visit)
        return "\n".join(seen) + path.read_bytes().decode("latin-1")
    return path.read_bytes().decode("latin-1")


def test_canary_in_headers_and_file_names_reaches_no_output_or_log(
    demo_build: DemoBuild,
) -> None:
    """Runs last in this module: the logs of the reruns above are searched too."""
    import h5py

    proj = demo_build.proj
    # the planted series went all the way into the release
    packed = set()
    for shard in (proj / "data/release/shards").glob("*.h5"):
        with h5py.File(shard, "r") as f:
            packed |= {str(g.attrs["series_instance_uid"]) for g in f["cases"].values()}
    assert demo_build.planted["series_instance_uid"] in packed
    # the catalog does hold it: the search below can see it
    assert CANARY in _text_of(proj / "data/index/series.parquet")

    hits = []
    for path in sorted(proj.rglob("*")):
        rel = path.relative_to(proj).as_posix()
        if not path.is_file() or rel.startswith((*CATALOG, ".dvc/", ".git/", "src/")):
            continue
        drop = ("patient_id",) if rel.startswith(PATIENT_TABLES) else ()
        if CANARY in rel or CANARY in _text_of(path, drop):
            hits.append(rel)
    assert hits == []
    assert len(demo_build.logs) >= 2  # dvc repro synth, dvc repro
    for proc in demo_build.logs:
        assert CANARY not in proc.stdout + proc.stderr
