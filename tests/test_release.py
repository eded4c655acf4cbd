"""pack.run end to end on a tiny archive: the release, its determinism, verify and open."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.release import CANARY, PARAMS, Inputs, case_id, write_cases

import ctcurate.release
import ctcurate.release.format
from ctcurate.errors import InputError, LockedError, VerifyError
from ctcurate.io.outputs import lock_path
from ctcurate.io.tables import write_parquet
from ctcurate.params import PackParams
from ctcurate.pipeline import pack


@pytest.fixture(scope="module")
def inputs(pack_inputs: Inputs) -> Inputs:
    """14 cases from 10 patients on 2 sites (``helpers.release.make_inputs``), shared."""
    return pack_inputs


def _pack(
    inputs: Inputs,
    out: Path,
    cases: Path | None = None,
    params: PackParams = PARAMS,
    scheduler: str | None = None,
) -> None:
    pack.run(
        cases=cases or inputs.cases,
        index_dir=inputs.index_dir,
        archive=inputs.archive,
        annotations_dir=inputs.annotations,
        out=out,
        params=params,
        scheduler=scheduler,
    )


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def release(pack_release: Path) -> Path:
    """The release of :func:`inputs` with ``PARAMS``, shared (tests change only copies)."""
    return pack_release


def _manifest(release: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((release / "manifest.json").read_text())
    return data


def _copy(release: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(release, dest)
    return dest


def test_release_accounts_for_every_case(release: Path) -> None:
    report = json.loads((release / "report.json").read_text())
    manifest = _manifest(release)
    reasons = {"empty_mask": 1, "gap": 1, "no_seg": 1, "seg_mismatch": 1, "unlabeled": 1}
    assert report["cases_seen"] == 14
    assert report["cases_packed"] == 9
    assert report["cases_excluded"] == 5
    assert report["excluded_reasons"] == reasons
    assert "release_id" not in report  # the manifest hashes the report (and the card)
    gallery = sorted(f"card/gallery/{c['case_id']}.png" for c in manifest["cases"])
    assert sorted(manifest["files"]) == sorted(
        ["card.html", "card.md", "card/montage.png", "report.json", *gallery]
    )
    assert sorted(e["reason"] for e in manifest["excluded"]) == sorted(reasons)
    assert len(manifest["cases"]) == 9
    assert sorted(manifest["shards"]) == [f"shard-0000{i}.h5" for i in range(3)]
    assert sorted(p.name for p in (release / "shards").iterdir()) == sorted(manifest["shards"])
    assert sum(len(v) for v in manifest["splits"].values()) == 9
    assert {s: len(v) for s, v in manifest["splits"].items()} == {"train": 4, "val": 2, "test": 3}
    assert manifest["params"]["shape"] == [4, 6, 6]
    assert manifest["counts"]["splits"] == {s: len(manifest["splits"][s]) for s in pack.SPLITS}
    for case in manifest["cases"]:
        assert case["shape"] == [4, 6, 6]
        assert case["typical"] in (0, 1)
        assert case["spacing_mm"] == [3.0, 3.0, 3.0]
        assert "patient_id" not in case
    assert ctcurate.release.verify(release).startswith(f"release {manifest['release_id'][:16]}")


def test_release_holds_no_patient_id(release: Path) -> None:
    for path in sorted(release.rglob("*")):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path.name


def test_card_describes_the_cohort(release: Path) -> None:
    text = (release / "card.md").read_text()
    assert "## Shortcut audit" in text
    assert "| site |" in text
    assert "| GE |" in text  # the vendor, never the header text
    assert "| no_seg | 1 |" in text
    assert (release / "card" / "montage.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_pack_is_byte_reproducible_across_processes_and_row_order(
    inputs: Inputs, release: Path, tmp_path: Path
) -> None:
    table = pq.read_table(inputs.cases)
    order = np.random.default_rng(4).permutation(table.num_rows)
    shuffled = tmp_path / "shuffled.parquet"
    write_parquet(shuffled, table.take(pa.array(order)))
    out = tmp_path / "release"
    code = (
        "import sys; from pathlib import Path; from ctcurate.pipeline import pack;"
        "from ctcurate.params import PackParams;"
        "a = [Path(x) for x in sys.argv[1:6]];"
        "pack.run(cases=a[0], index_dir=a[1], archive=a[2], annotations_dir=a[3], out=a[4],"
        " params=PackParams.model_validate_json(sys.argv[6]))"
    )
    args = [shuffled, inputs.index_dir, inputs.archive, inputs.annotations, out]
    # Another hash seed, and Blosc on one thread (the parent uses its default, all cores).
    env = {**os.environ, "PYTHONHASHSEED": "12345", "BLOSC_NTHREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", code, *map(str, args), PARAMS.model_dump_json()],
        check=True,
        env=env,
        capture_output=True,
    )
    assert _hashes(out) == _hashes(release)


@pytest.mark.slow
def test_pack_gives_the_same_bytes_in_one_process_on_a_pool_and_on_dask(
    inputs: Inputs, release: Path, tmp_path: Path
) -> None:
    from distributed import LocalCluster

    assert PARAMS.workers == 2  # the fixture's release was built on a pool of two
    _pack(inputs, tmp_path / "one", params=PARAMS.model_copy(update={"workers": 1}))
    with LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as cluster:
        _pack(inputs, tmp_path / "dask", scheduler=cluster.scheduler_address)
    assert _hashes(tmp_path / "one") == _hashes(release)
    assert _hashes(tmp_path / "dask") == _hashes(release)
    assert "workers" not in _manifest(release)["params"]  # how it ran is not what it holds


def test_one_changed_label_changes_the_release_id(
    inputs: Inputs, release: Path, tmp_path: Path
) -> None:
    rows = pq.read_table(inputs.cases).to_pylist()
    packed = {c["case_id"] for c in _manifest(release)["cases"]}
    target = next(r for r in rows if r["typical"] == 1 and r["case_id"] in packed)
    target["typical"], target["consensus_grade"] = 0, 3
    changed = tmp_path / "cases.parquet"
    write_cases(changed, rows)
    out = tmp_path / "release"
    _pack(inputs, out, cases=changed)
    before, after = _manifest(release), _manifest(out)
    assert after["release_id"] != before["release_id"]
    differing = {
        a["case_id"]: (a["split"], b["split"])
        for a, b in zip(after["cases"], before["cases"], strict=True)
        if a["sha256"] != b["sha256"]
    }
    # Only the relabelled case changes, and it stays in its split: splits are stable.
    assert list(differing) == [target["case_id"]]
    assert differing[target["case_id"]][0] == differing[target["case_id"]][1]
    assert after["splits"] == before["splits"]
    ctcurate.release.verify(out)


def test_a_subset_release_keeps_every_shared_case_in_its_split(
    inputs: Inputs, release: Path, tmp_path: Path
) -> None:
    rows = pq.read_table(inputs.cases).to_pylist()
    packed = sorted(c["case_id"] for c in _manifest(release)["cases"])
    dropped = set(packed[::3])  # a third of the packed cases leave
    subset = tmp_path / "cases.parquet"
    write_cases(subset, [r for r in rows if r["case_id"] not in dropped])
    _pack(inputs, tmp_path / "release", cases=subset)
    before = {c["case_id"]: c["split"] for c in _manifest(release)["cases"]}
    after = {c["case_id"]: c["split"] for c in _manifest(tmp_path / "release")["cases"]}
    assert set(after) == set(before) - dropped
    assert after == {c: before[c] for c in after}


def test_every_case_of_one_patient_shares_a_split(inputs: Inputs, tmp_path: Path) -> None:
    rows = pq.read_table(inputs.cases).to_pylist()
    for r in rows:  # one patient per site: four or five packable cases each
        r["patient_id"] = f"P-{r['site']}"
    one = tmp_path / "cases.parquet"
    write_cases(one, rows)
    _pack(inputs, tmp_path / "release", cases=one)
    by_site: dict[str, set[str]] = {}
    for case in _manifest(tmp_path / "release")["cases"]:
        by_site.setdefault(case["site"], set()).add(case["split"])
    assert sorted(by_site) == ["H01", "H02"]
    assert all(len(s) == 1 for s in by_site.values()), by_site
    splits = _manifest(tmp_path / "release")["splits"]
    assert sorted(splits) == ["test", "train", "val"]  # an empty split is listed too
    assert sum(not v for v in splits.values()) == 1


def test_verify_fails_on_a_flipped_byte(release: Path, tmp_path: Path) -> None:
    copy = _copy(release, tmp_path)
    shard = copy / "shards" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"shard-00001\.h5: sha256 does not match"):
        ctcurate.release.verify(copy)


def test_verify_fails_on_a_missing_shard(release: Path, tmp_path: Path) -> None:
    copy = _copy(release, tmp_path)
    (copy / "shards" / "shard-00002.h5").unlink()
    with pytest.raises(VerifyError, match="shard listed in the manifest is missing"):
        ctcurate.release.verify(copy)


def test_verify_fails_on_an_edited_manifest(release: Path, tmp_path: Path) -> None:
    copy = _copy(release, tmp_path)
    manifest = _manifest(copy)
    manifest["cases"][0]["typical"] = 1 - manifest["cases"][0]["typical"]
    (copy / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    with pytest.raises(VerifyError, match="release_id does not match the manifest's content"):
        ctcurate.release.verify(copy)


def test_open_yields_documented_samples_through_a_dataloader(release: Path) -> None:
    from torch.utils.data import DataLoader

    train = ctcurate.release.open(release, split="train")
    manifest = _manifest(release)
    assert len(train) == len(manifest["splits"]["train"])
    sample = train[0]
    assert tuple(sample["image"].shape) == (1, 4, 6, 6)
    assert str(sample["image"].dtype) == "torch.float32"
    assert str(sample["label"].dtype) == "torch.int64"
    assert sample["typical"] in (0, 1)
    assert sample["meta"]["split"] == "train"
    assert sample["image"].min().item() >= PARAMS.hu_min
    loader = DataLoader(train, batch_size=2, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (1, 4, 6, 6)
        seen += list(batch["case_id"])
    assert sorted(seen) == sorted(manifest["splits"]["train"])
    train.close()


def test_open_samples_carry_the_stored_case_attributes(release: Path) -> None:
    import h5py

    data = ctcurate.release.open(release)
    for i, case in enumerate(data.cases):
        sample = data[i]
        with h5py.File(release / "shards" / case["shard"], "r") as h5:
            image, label, meta = ctcurate.release.format.read_case(h5, case["case_id"])
        assert sample["meta"] == {k: "null" if v is None else v for k, v in meta.items()}
        assert np.array_equal(sample["image"][0].numpy(), image.astype(np.float32))
        assert np.array_equal(sample["label"][0].numpy(), label.astype(np.int64))
    data.close()


def test_cli_verify(release: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctcurate.cli import app

    result = CliRunner().invoke(app, ["verify", str(release)])
    assert result.exit_code == 0
    assert "verified: 9 cases in 3 shards" in result.output

    copy = _copy(release, tmp_path)
    (copy / "shards" / "shard-00000.h5").write_bytes(b"not hdf5")
    proc = subprocess.run(
        [sys.executable, "-m", "ctcurate", "verify", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == VerifyError.exit_code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ctcurate: error: ")
    assert "shard-00000.h5: sha256 does not match" in lines[0]


@contextlib.contextmanager
def _stalled_pack(inputs: Inputs, out: Path, marker: Path) -> Iterator[None]:
    """Start pack in a child that stalls after writing its first shard; kill -9 it on exit."""
    code = (
        "import sys, time; from pathlib import Path; from ctcurate.pipeline import pack;"
        "from ctcurate.params import PackParams;"
        "orig = pack.write_shard\n"
        "def stall(path, records):\n"
        "    entries = orig(path, records)\n"
        "    Path(sys.argv[7]).touch()\n"
        "    time.sleep(120)\n"
        "    return entries\n"
        "pack.write_shard = stall\n"
        "a = [Path(x) for x in sys.argv[1:6]]\n"
        "pack.run(cases=a[0], index_dir=a[1], archive=a[2], annotations_dir=a[3], out=a[4],"
        " params=PackParams.model_validate_json(sys.argv[6]))"
    )
    args = [inputs.cases, inputs.index_dir, inputs.archive, inputs.annotations, out]
    child = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args), PARAMS.model_dump_json(), str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"pack exited before the kill point:\n{child.communicate()[1]}")
            assert time.monotonic() < deadline, "pack never reached the kill point"
            time.sleep(0.05)
        yield
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=30)


@pytest.mark.slow
def test_kill_9_mid_pack_leaves_the_previous_release(
    inputs: Inputs, release: Path, tmp_path: Path
) -> None:
    out = tmp_path / "release"
    shutil.copytree(release, out)
    before = _hashes(out)
    with _stalled_pack(inputs, out, tmp_path / "marker"):
        pass
    assert _hashes(out) == before
    ctcurate.release.verify(out)


@pytest.mark.slow
def test_kill_9_mid_first_pack_leaves_no_release(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "release"
    with _stalled_pack(inputs, out, tmp_path / "marker"):
        pass
    assert not out.exists()


@pytest.mark.slow
def test_a_second_build_of_one_release_fails_fast(
    inputs: Inputs, release: Path, tmp_path: Path
) -> None:
    out = tmp_path / "release"
    shutil.copytree(release, out)
    before = _hashes(out)
    lock = lock_path(out)
    assert lock == tmp_path / ".release.lock"  # beside the DVC out, not inside it
    with _stalled_pack(inputs, out, tmp_path / "marker"):
        pid = int(lock.read_text())
        started = time.monotonic()
        with pytest.raises(
            LockedError,
            match=rf"release: another process is writing this output \(pid {pid} holds the lock",
        ):
            _pack(inputs, out)
        assert time.monotonic() - started < 5  # fails fast, does not wait
    assert _hashes(out) == before
    # The killed holder left its lock file behind; the kernel released the lock itself.
    assert lock.exists()
    assert list(tmp_path.glob(".release.*.tmp"))  # the killed build's temporary folder
    _pack(inputs, out)
    assert not lock.exists()
    assert not list(tmp_path.glob(".release.*.tmp"))  # cleaned up by the next build
    assert _hashes(out) == _hashes(release)


def test_nothing_packable_fails_naming_the_cases_file(inputs: Inputs, tmp_path: Path) -> None:
    rows = pq.read_table(inputs.cases).to_pylist()
    for row in rows:
        row["typical"] = None
    cases = tmp_path / "cases.parquet"
    write_cases(cases, rows)
    with pytest.raises(
        InputError, match=r"cases\.parquet: no case could be packed \(unlabeled=14\)"
    ):
        _pack(inputs, tmp_path / "release", cases=cases)
    assert not (tmp_path / "release").exists()


def test_duplicate_case_ids_are_rejected(inputs: Inputs, tmp_path: Path) -> None:
    rows = pq.read_table(inputs.cases).to_pylist()
    cases = tmp_path / "cases.parquet"
    write_cases(cases, [*rows, rows[0]])
    with pytest.raises(InputError, match=f"case_id {rows[0]['case_id']} appears 2 times"):
        _pack(inputs, tmp_path / "release", cases=cases)


def test_missing_cases_table_is_an_input_error(inputs: Inputs, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.parquet: no such Parquet file"):
        _pack(inputs, tmp_path / "release", cases=tmp_path / "nope.parquet")


# --- keyed patient pseudonyms ----------------------------------------------------------------

KEY = "k" * 16 + "0123456789abcdef"  # 32 characters


def test_pseudonyms_fail_closed_without_a_key(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = PARAMS.model_copy(update={"patient_pseudonyms": True})
    monkeypatch.delenv(pack.PSEUDONYM_KEY_ENV, raising=False)
    with pytest.raises(InputError, match=r"CTCURATE_PSEUDONYM_KEY is not set"):
        _pack(inputs, tmp_path / "none", params=params)
    monkeypatch.setenv(pack.PSEUDONYM_KEY_ENV, "short")
    with pytest.raises(InputError, match=r"shorter than 32 characters"):
        _pack(inputs, tmp_path / "short", params=params)
    assert not (tmp_path / "none").exists()
    assert not (tmp_path / "short").exists()


@pytest.mark.slow
def test_pseudonyms_are_keyed_per_site_and_patient(
    inputs: Inputs, release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = PARAMS.model_copy(update={"patient_pseudonyms": True})
    monkeypatch.setenv(pack.PSEUDONYM_KEY_ENV, KEY)
    _pack(inputs, tmp_path / "a", params=params)
    _pack(inputs, tmp_path / "b", params=params)
    monkeypatch.setenv(pack.PSEUDONYM_KEY_ENV, KEY[::-1])
    _pack(inputs, tmp_path / "other", params=params)

    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")  # same key: same bytes
    a, other = _manifest(tmp_path / "a"), _manifest(tmp_path / "other")
    assert a["release_id"] not in {other["release_id"], _manifest(release)["release_id"]}
    assert a["pseudonym_key_id"] != other["pseudonym_key_id"]
    assert "pseudonym_key_id" not in _manifest(release)  # off: no pseudonyms, no key id

    rows = {str(r["case_id"]): r for r in pq.read_table(inputs.cases).to_pylist()}
    by_patient: dict[tuple[str, str], set[str]] = {}
    for case in a["cases"]:
        row = rows[case["case_id"]]
        pseudonym = case["patient_pseudonym"]
        assert len(pseudonym) == 32
        assert pseudonym == pack.patient_pseudonym(KEY.encode(), row["site"], row["patient_id"])
        by_patient.setdefault((row["site"], row["patient_id"]), set()).add(pseudonym)
    assert all(len(p) == 1 for p in by_patient.values())  # one pseudonym per patient
    assert len({p for ps in by_patient.values() for p in ps}) == len(by_patient)
    others = {c["case_id"]: c["patient_pseudonym"] for c in other["cases"]}
    assert all(others[c["case_id"]] != c["patient_pseudonym"] for c in a["cases"])
    for path in sorted((tmp_path / "a").rglob("*")):  # neither the key nor a raw id
        if path.is_file():
            data = path.read_bytes()
            assert KEY.encode() not in data, path.name
            assert CANARY.encode() not in data, path.name


def test_a_pseudonym_depends_on_site_patient_and_key() -> None:
    key = KEY.encode()
    one = pack.patient_pseudonym(key, "H01", "P1")
    assert one == pack.patient_pseudonym(key, "H01", "P1")
    assert one != pack.patient_pseudonym(key, "H02", "P1")  # ids are per hospital
    assert one != pack.patient_pseudonym(key, "H01", "P2")
    assert one != pack.patient_pseudonym(key[::-1], "H01", "P1")
    assert pack.patient_pseudonym(key, "H0", "1P1") != pack.patient_pseudonym(key, "H01", "P1")
    assert int(one, 16) >= 0
    assert len(one) == 32


# --------------------------------------------------------------------------- ctcurate diff


def _k(k: int) -> str:
    """Case id of the fixture's case ``k``."""
    return case_id("H01" if k % 2 == 0 else "H02", f"1.2.826.0.1.3680043.{k + 1}")


@pytest.fixture(scope="module")
def two_releases(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An old and a new release of the fixture's cases, with known differences: case 0
    relabelled, case 2 dropped from the cases table, case 8 unlabeled (excluded), case 4
    moved to patient 6's split (train → test), case 9 labelled (added); pack.shard_max_cases
    3 → 4; rule b.sql changed, c.sql added."""
    root = tmp_path_factory.mktemp("diff")
    for name, files in (
        ("old", {"a.sql": "x", "b.sql": "y"}),
        ("new", {"a.sql": "x", "b.sql": "z", "c.sql": "w"}),
    ):
        folder = root / name / "select"
        folder.mkdir(parents=True)
        for file, text in files.items():
            (folder / file).write_text(text)
    old = root / "old" / "release"
    pack.run(
        inputs.cases,
        inputs.index_dir,
        inputs.archive,
        inputs.annotations,
        old,
        PARAMS,
        rules=[root / "old" / "select"],
    )
    rows = [r for r in pq.read_table(inputs.cases).to_pylist() if r["case_id"] != _k(2)]
    for r in rows:
        if r["case_id"] == _k(0):
            r["typical"], r["consensus_grade"], r["pcr"] = 1, 1, "positive"
        elif r["case_id"] == _k(8):
            r["typical"], r["consensus_grade"] = None, None
        elif r["case_id"] == _k(4):
            r["patient_id"] = f"{CANARY}6"
        elif r["case_id"] == _k(9):
            r["typical"], r["consensus_grade"] = 1, 2
    write_cases(root / "cases.parquet", rows)
    new = root / "new" / "release"
    params = PARAMS.model_copy(update={"shard_max_cases": 4})
    pack.run(
        root / "cases.parquet",
        inputs.index_dir,
        inputs.archive,
        inputs.annotations,
        new,
        params,
        rules=[root / "new" / "select"],
    )
    return old, new


@pytest.mark.slow
def test_diff_names_every_change_between_two_releases(two_releases: tuple[Path, Path]) -> None:
    from ctcurate.release import diff

    old, new = two_releases
    result = json.loads(diff.run(old, new, "json"))
    assert result["old_release_id"] == _manifest(old)["release_id"] != result["new_release_id"]
    assert result["cases"] == [9, 8]
    assert [(c["case_id"], c["split"]) for c in result["added"]] == [(_k(9), "test")]
    assert sorted((c["case_id"], c["reason"]) for c in result["removed"]) == sorted(
        [(_k(2), "not in the cases table"), (_k(8), "unlabeled")]
    )
    assert result["relabelled"] == [
        {
            "case_id": _k(0),
            "fields": {
                "consensus_grade": {"old": 4, "new": 1},
                "pcr": {"old": "negative", "new": "positive"},
                "typical": {"old": 0, "new": 1},
            },
        }
    ]
    assert result["moved"] == [{"case_id": _k(4), "old": "train", "new": "test"}]
    assert result["changed"] == []
    assert result["counts"]["site"] == {"H01": [5, 3], "H02": [4, 5]}
    assert result["counts"]["typical"] == {"0": [5, 3], "1": [4, 5]}
    assert result["excluded_reasons"]["unlabeled"] == [1, 1]  # case 9 in, case 8 out
    assert result["params"] == {"shard_max_cases": {"old": 3, "new": 4}}
    assert result["rules_recorded"] is True
    assert sorted(result["rules"]) == ["select/b.sql", "select/c.sql"]
    assert result["rules"]["select/c.sql"]["old"] is None


@pytest.mark.slow
def test_diff_markdown_is_a_pr_comment(two_releases: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    from ctcurate.cli import app

    old, new = two_releases
    result = CliRunner().invoke(app, ["diff", str(old), str(new)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.startswith(f"## Release diff `{_manifest(old)['release_id'][:16]}` → ")
    assert "9 → 8 cases: 1 added, 2 removed, 1 relabelled, 1 moved between splits" in text
    assert f"| {_k(0)} | typical | 0 | 1 |" in text
    assert f"| {_k(4)} | train | test |" in text
    assert f"| {_k(8)} | train | H01 | covid | 0 | unlabeled |" in text
    assert "| site | H01 | 5 | 3 | -2 |" in text
    assert "| param | pack.shard_max_cases | 3 | 4 |" in text
    assert "| rule file | select/c.sql | — |" in text
    assert CANARY not in text


def test_diff_of_a_release_with_itself_is_empty(release: Path) -> None:
    from ctcurate.release import diff

    text = diff.run(release, release)
    assert "9 → 9 cases: 0 added, 0 removed, 0 relabelled, 0 moved" in text
    assert "The releases are identical." in text
    result = json.loads(diff.run(release, release, "json"))
    assert result["params"] == {}
    assert result["rules_recorded"] is False


def test_diff_of_a_folder_without_a_manifest_is_one_line(release: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ctcurate", "diff", str(release), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == InputError.exit_code
    assert (
        proc.stderr.strip()
        == f"ctcurate: error: {tmp_path / 'manifest.json'}: no manifest (is this a release folder?)"
    )


def test_pack_rules_that_do_not_exist_fail_before_any_work(inputs: Inputs, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope: rule file or folder not found"):
        pack.run(
            inputs.cases,
            inputs.index_dir,
            inputs.archive,
            inputs.annotations,
            tmp_path / "r",
            PARAMS,
            rules=[tmp_path / "nope"],
        )
    assert not (tmp_path / "r").exists()


def test_meta_tensor_samples_work_with_monai_spatial_transforms(
    release: Path, tmp_path: Path
) -> None:
    import nibabel as nib
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms import Compose, Orientationd, SaveImaged, Spacingd

    from ctcurate.pipeline.export import affine_ras

    data = ctcurate.release.open(release, split="train", meta_tensor=True)
    sample = data[0]
    case = next(c for c in _manifest(release)["cases"] if c["case_id"] == sample["case_id"])
    assert isinstance(sample["image"], MetaTensor)
    assert isinstance(sample["label"], MetaTensor)
    # voxel [k, j, i] of the (z, y, x) sample lies where the export's (x, y, z) voxel does
    zyx = sample["image"].affine.numpy()
    xyz = affine_ras(case)
    k, j, i = 3, 2, 5
    assert np.allclose(zyx @ [k, j, i, 1], xyz @ [i, j, k, 1])
    out = Compose(
        [
            Orientationd(keys=["image", "label"], axcodes="RAS"),
            Spacingd(keys=["image"], pixdim=(2.0, 2.0, 2.0)),
            SaveImaged(
                keys=["label"],
                output_dir=tmp_path,
                output_postfix="",
                resample=False,
                separate_folder=False,
                print_log=False,
            ),
        ]
    )(sample)
    # RAS order: x, y, z; the label keeps its voxels, only reoriented
    assert tuple(out["label"].shape[1:]) == tuple(sample["label"].shape[1:][::-1])
    assert np.allclose(out["image"].pixdim.numpy(), [2.0, 2.0, 2.0])
    saved = nib.load(tmp_path / f"{sample['case_id']}.nii.gz")
    stored = sample["label"][0].numpy()  # (z, y, x): S, P, L
    assert np.array_equal(np.asarray(saved.dataobj), stored.transpose(2, 1, 0)[::-1, ::-1, :])
    _, ny, nx = stored.shape
    # the saved voxel of export voxel (i, j, k) lies at the same RAS point
    assert np.allclose(saved.affine @ [nx - 1 - i, ny - 1 - j, k, 1], xyz @ [i, j, k, 1])
    data.close()
    plain = ctcurate.release.open(release, split="train")
    assert type(plain[0]["image"]).__name__ == "Tensor"  # the training path: plain tensors
    plain.close()


HEAVY = (
    "torch",
    "monai",
    "dvc",
    "dask",
    "duckdb",
    "matplotlib",
    "pydicom",
    "scipy",
    "typer",
    "pydantic",
    "pyarrow",
    "highdicom",
    "dvclive",
    "fcntl",
)


def test_a_release_reads_and_verifies_with_h5py_hdf5plugin_and_numpy_only(release: Path) -> None:
    # a consumer's environment: every heavy package (and POSIX-only fcntl) is missing
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {HEAVY!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import h5py, ctcurate.release as r\n"
        "print(r.verify(sys.argv[1]))\n"
        "m = r.read_manifest(sys.argv[1])\n"
        "case = m['cases'][0]\n"
        "with h5py.File(sys.argv[1] + '/shards/' + case['shard']) as h5:\n"
        "    image, label, meta = r.read_case(h5, case['case_id'])\n"
        "print(image.dtype, label.dtype, meta['case_id'] == case['case_id'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(release)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("int16 uint8 True")


def test_core_dependencies_are_the_reader_s_and_the_cli_names_a_missing_extra() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    core = {re.split(r"[<>=\[]", d)[0] for d in project["project"]["dependencies"]}
    assert core == {"h5py", "hdf5plugin", "numpy"}
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'typer':\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from ctcurate.entry import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ctcurate: error: the command line needs the 'build' extra (module typer is missing): "
        "pip install 'ctcurate[build,train]'"
    ]


def test_the_manifest_names_its_code_and_environment(release: Path) -> None:
    from ctcurate.provenance import provenance

    assert _manifest(release)["provenance"] == provenance("ctcurate.pipeline.pack")
