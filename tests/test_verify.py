"""verify: an edited release fails, even with its release_id recomputed; --expect pins the id."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import ctcurate.release
from ctcurate.errors import VerifyError
from ctcurate.io.atomic import sha256_file, write_json
from ctcurate.release.format import (
    MANIFEST,
    SHARD_DIR,
    CaseRecord,
    build_manifest,
    manifest_release_id,
    write_shard,
)

ROOT = Path(__file__).resolve().parents[1]
Manifest = dict[str, Any]


def _records() -> list[CaseRecord]:
    rng = np.random.default_rng(3)
    return [
        CaseRecord(
            case_id=f"case{i}",
            image=rng.integers(-1024, 400, size=(4, 5, 6)).astype(np.int16),
            label=rng.integers(0, 4, size=(4, 5, 6)).astype(np.uint8),
            meta={
                "case_id": f"case{i}",
                "split": split,
                "site": "H01",
                "typical": i % 2,
                "consensus_grade": 3 - 2 * (i % 2),
                "exclusion": None,
                "spacing_mm": [3.0, 3.0, 3.0],
            },
        )
        for i, split in enumerate(("train", "train", "test", "val"))
    ]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four cases in two shards, a card and a report, as pack lays them out."""
    out = tmp_path_factory.mktemp("rel") / "release"
    records = _records()
    entries = write_shard(out / SHARD_DIR / "shard-00000.h5", records[:2])
    entries += write_shard(out / SHARD_DIR / "shard-00001.h5", records[2:])
    (out / "card").mkdir()
    (out / "card.md").write_text("# Dataset card\n\n4 cases packed.\n", encoding="utf-8")
    (out / "card" / "montage.png").write_bytes(b"\x89PNG fake")
    write_json(out / "report.json", {"cases_packed": 4, "cases_seen": 4})
    write_json(out / MANIFEST, build_manifest(out, entries, {"shape": [4, 5, 6]}, "test"))
    return out


@pytest.fixture
def release(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "release"))


def _manifest(release: Path) -> Manifest:
    data: Manifest = json.loads((release / MANIFEST).read_text(encoding="utf-8"))
    return data


def _rewrite(release: Path, edit: Callable[[Manifest], None]) -> str:
    """Edit the manifest and recompute its release_id, as a careful forger would."""
    manifest = _manifest(release)
    edit(manifest)
    manifest["release_id"] = manifest_release_id(manifest)
    write_json(release / MANIFEST, manifest)
    return str(manifest["release_id"])


def _case(manifest: Manifest, case_id: str) -> dict[str, Any]:
    return next(c for c in manifest["cases"] if c["case_id"] == case_id)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctcurate", "verify", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_release_verifies_and_hashes_its_card_and_report(release: Path) -> None:
    manifest = _manifest(release)
    assert sorted(manifest["files"]) == ["card.md", "card/montage.png", "report.json"]
    assert manifest["files"]["card.md"]["bytes"] == (release / "card.md").stat().st_size
    summary = ctcurate.release.verify(release, expect=manifest["release_id"])
    assert summary == (
        f"release {manifest['release_id'][:16]} verified: 4 cases in 2 shards; "
        "its id is the expected one"
    )


def test_edited_label_with_recomputed_release_id_fails(release: Path) -> None:
    def flip(m: Manifest) -> None:
        case = _case(m, "case0")
        case["typical"], case["consensus_grade"] = 1, 1

    _rewrite(release, flip)
    with pytest.raises(
        VerifyError,
        match=r"shard-00000\.h5: case case0: manifest attribute 'consensus_grade' does not match",
    ):
        ctcurate.release.verify(release)


def test_test_case_moved_into_train_fails(release: Path) -> None:
    def move(m: Manifest) -> None:
        _case(m, "case2")["split"] = "train"
        m["splits"]["test"].remove("case2")
        m["splits"]["train"] = sorted([*m["splits"]["train"], "case2"])
        del m["splits"]["test"]

    _rewrite(release, move)
    with pytest.raises(VerifyError, match=r"case case2: manifest attribute 'split' does not match"):
        ctcurate.release.verify(release)


def test_splits_that_disagree_with_the_cases_fail(release: Path) -> None:
    _rewrite(release, lambda m: m["splits"]["train"].remove("case1"))
    with pytest.raises(VerifyError, match="splits do not list the cases of each split"):
        ctcurate.release.verify(release)


def test_an_empty_split_is_listed_and_verifies(release: Path) -> None:
    # pack lists train, val and test always; a small release can leave one empty
    _rewrite(release, lambda m: m["splits"].update(holdout=[]))
    assert "verified" in ctcurate.release.verify(release)


def test_case_dropped_from_the_manifest_but_left_in_its_shard_fails(release: Path) -> None:
    def drop(m: Manifest) -> None:
        m["cases"] = [c for c in m["cases"] if c["case_id"] != "case3"]
        del m["splits"]["val"]

    _rewrite(release, drop)
    with pytest.raises(
        VerifyError, match=r"shard-00001\.h5: case case3 is in the shard but the manifest does not"
    ):
        ctcurate.release.verify(release)


def test_case_moved_to_another_shard_in_the_manifest_fails(release: Path) -> None:
    _rewrite(release, lambda m: _case(m, "case0").update(shard="shard-00001.h5"))
    with pytest.raises(VerifyError, match=r"shard-00000\.h5: case case0 is in the shard but the"):
        ctcurate.release.verify(release)


def test_attribute_added_to_the_manifest_only_fails(release: Path) -> None:
    _rewrite(release, lambda m: _case(m, "case1").update(cohort="covid"))
    with pytest.raises(VerifyError, match="manifest attribute 'cohort' is not in the shard"):
        ctcurate.release.verify(release)


@pytest.mark.parametrize("name", ["card.md", "report.json", "card/montage.png"])
def test_edited_card_or_report_fails(release: Path, name: str) -> None:
    with (release / name).open("ab") as f:
        f.write(b"\n")
    with pytest.raises(VerifyError, match=rf"{name}: sha256 does not match the manifest"):
        ctcurate.release.verify(release)


def test_missing_card_and_unlisted_file_fail(release: Path) -> None:
    (release / "notes.txt").write_text("added later\n", encoding="utf-8")
    with pytest.raises(VerifyError, match=r"notes\.txt: file not listed in the manifest"):
        ctcurate.release.verify(release)
    (release / "notes.txt").unlink()
    (release / "card.md").unlink()
    with pytest.raises(VerifyError, match=r"card\.md: file listed in the manifest is missing"):
        ctcurate.release.verify(release)


def test_a_rehashed_manifest_is_caught_by_expect(release: Path) -> None:
    original = _manifest(release)["release_id"]
    card = release / "card.md"
    card.write_text("# Dataset card\n\nAll labels reviewed.\n", encoding="utf-8")

    def rehash(m: Manifest) -> None:
        m["files"]["card.md"] = {
            "sha256": sha256_file(card),
            "bytes": card.stat().st_size,
        }

    forged = _rewrite(release, rehash)
    assert ctcurate.release.verify(release).startswith(f"release {forged[:16]} verified")
    with pytest.raises(
        VerifyError, match=rf"release {forged[:16]} is not the expected release {original[:16]}"
    ):
        ctcurate.release.verify(release, expect=original)


def test_open_with_expect_verifies_first(release: Path) -> None:
    original = _manifest(release)["release_id"]
    data = ctcurate.release.open(release, split="train", expect=original.upper())
    assert len(data) == 2
    _rewrite(release, lambda m: _case(m, "case0").update(typical=1))
    with pytest.raises(VerifyError, match="is not the expected release"):
        ctcurate.release.open(release, expect=original)
    ctcurate.release.open(release)  # without expect nothing is checked


def test_open_with_expect_refuses_a_manifest_replaced_after_verify(
    release: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = _manifest(release)["release_id"]
    verify = ctcurate.release.verify

    def verify_then_swap(path: Path | str, expect: str | None = None) -> str:
        summary = verify(path, expect=expect)
        _rewrite(release, lambda m: _case(m, "case0").update(typical=1))
        return summary

    monkeypatch.setattr(ctcurate.release, "verify", verify_then_swap)
    with pytest.raises(VerifyError, match="changed while it was being verified"):
        ctcurate.release.open(release, expect=original)


def test_cli_expect_mismatch_and_a_malformed_id(release: Path) -> None:
    release_id = _manifest(release)["release_id"]
    ok = _cli(str(release), "--expect", release_id)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("its id is the expected one")
    for expect, message in (
        ("0" * 64, f"is not the expected release {'0' * 16}"),
        (release_id[:16], "not a release id (64 hex digits)"),
    ):
        proc = _cli(str(release), "--expect", expect)
        assert proc.returncode == VerifyError.exit_code
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("ctcurate: error: ")
        assert message in lines[0]


MALFORMED: list[tuple[str, str, str]] = [
    ("list", "[1, 2]", "expected a JSON object, got a list"),
    ("not_json", "{'format': 1", "not valid JSON"),
    ("not_utf8", '{"a": "\udcff"}', "not valid JSON"),
]


EDITS: list[tuple[str, Callable[[Manifest], None], str]] = [
    ("no_cases", lambda m: m.pop("cases"), "missing key 'cases'"),
    ("cases_object", lambda m: m.update(cases={}), "cases: expected a list, got an object"),
    ("case_string", lambda m: m["cases"].__setitem__(0, "case0"), r"cases\[0\]: expected an obj"),
    ("no_shard", lambda m: m["cases"][0].pop("shard"), r"cases\[0\]: missing key 'shard'"),
    (
        "shape_text",
        lambda m: m["cases"][1].update(shape="4x5x6"),
        r"cases\[1\]\.shape: expected a list, got a string",
    ),
    (
        "shape_bool",
        lambda m: m["cases"][1].update(shape=[4, True, 6]),
        r"cases\[1\]\.shape: expected 3 non-negative integers",
    ),
    ("bad_digest", lambda m: m["cases"][0].update(sha256="x"), r"sha256: not a sha256"),
    (
        "nested_attribute",
        lambda m: m["cases"][0].update(typical={"v": 1}),
        r"cases\[0\]\.typical: expected a scalar",
    ),
    (
        "duplicate_case",
        lambda m: m["cases"].append(dict(m["cases"][0])),
        "case case0 is listed twice",
    ),
    (
        "shard_outside",
        lambda m: m["shards"].update({"../x.h5": m["shards"]["shard-00000.h5"]}),
        r"shards\['\.\./x\.h5'\]: not a shard file name",
    ),
    (
        "file_outside",
        lambda m: m["files"].update({"/etc/passwd": m["files"]["card.md"]}),
        r"files\['/etc/passwd'\]: not a relative path",
    ),
    ("bytes_text", lambda m: m["files"]["card.md"].update(bytes="9"), r"bytes: expected an int"),
    ("splits_list", lambda m: m.update(splits=[]), "splits: expected an object, got a list"),
    ("split_ids", lambda m: m["splits"].update(train="case0"), r"splits\['train'\]: expected a"),
    ("version", lambda m: m.update(format_version="1"), "format_version 1 is not supported"),
    ("no_files", lambda m: m.pop("files"), "missing key 'files'"),
]


@pytest.mark.parametrize(("name", "text", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_unparsable_manifest_is_one_verify_error(
    release: Path, name: str, text: str, message: str
) -> None:
    (release / MANIFEST).write_bytes(text.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(VerifyError, match=rf"manifest\.json: {message}"):
        ctcurate.release.verify(release)


@pytest.mark.parametrize(("name", "edit", "message"), EDITS, ids=[e[0] for e in EDITS])
def test_malformed_manifest_is_one_verify_error(
    release: Path, name: str, edit: Callable[[Manifest], None], message: str
) -> None:
    _rewrite(release, edit)  # a consistent release_id: only the structure is wrong
    with pytest.raises(VerifyError, match=rf"manifest\.json: .*{message}") as info:
        ctcurate.release.verify(release)
    assert "\n" not in str(info.value)


def test_cli_malformed_manifest_is_one_line_without_traceback(release: Path) -> None:
    (release / MANIFEST).write_text("[]\n", encoding="utf-8")
    proc = _cli(str(release))
    assert proc.returncode == VerifyError.exit_code
    assert proc.stderr.strip() == (
        f"ctcurate: error: {release / MANIFEST}: expected a JSON object, got a list"
    )
    assert "Traceback" not in proc.stderr


def test_train_records_the_release_id_in_dvc_lock(tmp_path: Path) -> None:
    """dvc.yaml makes DVC write the release id into dvc.lock; the documented command reads it."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert {"data/release/manifest.json": ["release_id"]} in stages["train"]["params"]
    docs = (ROOT / "docs" / "release.md").read_text(encoding="utf-8")
    code = docs.split("RELEASE_ID=$(", 1)[1].split('python -c "', 1)[1].split('"', 1)[0]
    release_id = "ab" * 32
    lock = {  # the shape DVC 3 writes for a params dependency on a file inside an out
        "schema": "2.0",
        "stages": {
            "train": {
                "cmd": "ctcurate train",
                "params": {
                    "params.yaml": {"train": {"epochs": 1}},
                    "data/release/manifest.json": {"release_id": release_id},
                },
            }
        },
    }
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=yaml.safe_dump(lock),
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == release_id
