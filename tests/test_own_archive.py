"""An archive of one's own: ``scripts/own_archive.py`` (README, "A real archive") and
``dvc repro`` on an archive written by another generator (``tests/phantom``), with a
hospital's annotation files and a radiologist's audit list."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pyarrow.parquet as pq
import pytest
import yaml
from helpers.demo import BIN, ROOT, project_copy, run
from phantom import PhantomParams, build_archive, write_annotations

SCRIPT = ROOT / "scripts" / "own_archive.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_archive", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--project", str(project), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _inputs(project: Path) -> list[str]:
    (project / "hospital" / "archive").mkdir(parents=True)
    (project / "hospital" / "annotations").mkdir()
    (project / "audit.csv").write_text("series_instance_uid,site,pneumonia\n")
    return [
        "--archive",
        "hospital/archive",
        "--annotations",
        "hospital/annotations",
        "--audit-list",
        "audit.csv",
    ]


def test_the_demo_pipeline_is_pointed_at_other_inputs(tmp_path: Path) -> None:
    demo = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    text = _script().rewrite(
        (ROOT / "dvc.yaml").read_text(), "/mnt/pacs/archive", "../ann", "stages/select/a.csv"
    )
    mine = yaml.safe_load(text)
    assert mine["vars"] == [
        {
            "archive": "/mnt/pacs/archive",
            "annotations": "../ann",
            "audit_list": "stages/select/a.csv",
        }
    ]
    assert set(mine["stages"]) == set(demo["stages"]) - {"synth", "select_audit"}
    assert "data/synth" not in yaml.safe_dump(mine["stages"])
    for name, stage in mine["stages"].items():
        if name in ("snapshot", "select"):
            assert stage["outs"] == demo["stages"][name]["outs"]
            continue
        assert stage == demo["stages"][name], name  # every other stage as it was
    assert "--seg" not in mine["stages"]["select"]["cmd"]
    assert "--truth" not in mine["stages"]["select"]["cmd"]
    # comments stay
    assert "# The release build." in text


def test_the_script_repoints_its_own_edit_and_refuses_a_half_edited_one(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    args = _inputs(tmp_path)
    done = _call(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    edited = (tmp_path / "dvc.yaml").read_bytes()
    again = _call(tmp_path, *args)  # the same paths: the same file
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "dvc.yaml").read_bytes() == edited
    (tmp_path / "moved").mkdir()
    moved = _call(tmp_path, *args[:1], "moved", *args[2:])  # the archive moved: vars only
    assert moved.returncode == 0, moved.stderr
    repointed = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    assert repointed["vars"][0]["archive"] == "moved"
    before = yaml.safe_load(edited)
    assert repointed["stages"] == before["stages"]
    assert len((tmp_path / "dvc.yaml").read_text().splitlines()) == len(edited.splitlines())
    # a pipeline edited half-way by hand (synth gone, the rest of the demo still there)
    half = _script()._drop_stages((ROOT / "dvc.yaml").read_text(), ("synth",))
    (tmp_path / "dvc.yaml").write_text(half)
    refused = _call(tmp_path, *args)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1  # one line, no traceback
    assert "not the demo's pipeline; nothing changed" in refused.stderr
    assert (tmp_path / "dvc.yaml").read_text() == half
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    missing = _call(tmp_path, *args[:-1], "nowhere.csv")
    assert missing.returncode == 2
    assert "--audit-list nowhere.csv: no such file" in missing.stderr
    spaced = _call(tmp_path, *args[:1], "my archive", *args[2:])
    assert spaced.returncode == 2
    assert "whitespace" in spaced.stderr
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()


@pytest.mark.e2e
@pytest.mark.slow
def test_dvc_repro_on_an_archive_written_by_another_generator(tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    proj = project_copy(tmp_path / "proj")
    hospital = tmp_path / "hospital"
    params = PhantomParams(
        seed=5,
        patients=12,
        pneumonia_share=0.6,
        matrix=(64, 96),
        slices=(24, 32),
        patient_name="pseudonym",  # PatientName = PatientID, as TCIA writes it
        write_seg=True,
    )
    truth = build_archive(hospital, params)
    write_annotations(hospital / "annotations", truth)
    rows = truth.to_pylist()
    audit = ["series_instance_uid,site,pneumonia"]
    audit += [
        f"{r['series_instance_uid']},{r['site']},{'yes' if r['pneumonia'] else 'no'}" for r in rows
    ]
    (proj / "stages" / "select" / "audit_list.csv").write_text("\n".join(audit) + "\n")

    edit = _call(
        proj,
        "--archive",
        str(hospital / "archive"),
        "--annotations",
        str(hospital / "annotations"),
        "--audit-list",
        "stages/select/audit_list.csv",
    )
    assert edit.returncode == 0, edit.stderr
    built = run(["dvc", "repro"], proj)
    ran = [line for line in built.stdout.splitlines() if line.startswith("Running stage")]
    assert not any("synth" in line or "select_audit" in line for line in ran)

    index = json.loads((proj / "data/index/report.json").read_text())
    files = sum(int(r["slices"]) for r in rows)
    assert (index["files_seen"], index["files_indexed"]) == (files, files)  # pseudonyms pass

    select = json.loads((proj / "data/select/report.json").read_text())
    assert select["series_seen"] == len(rows)
    assert select["series_seen"] == select["series_selected"] + select["series_rejected"]
    assert select["series_selected"] > 0
    selected = pq.read_table(proj / "data/select/series.parquet").to_pylist()
    assert {r["series_instance_uid"] for r in selected} <= {r["series_instance_uid"] for r in rows}

    cases = pq.read_table(proj / "data/cases/cases.parquet").num_rows
    assert cases > 0
    manifest = json.loads((proj / "data/release/manifest.json").read_text())
    assert 0 < len(manifest["cases"]) <= cases
    verified = run([str(BIN / "ctcurate"), "verify", "data/release"], proj)
    assert manifest["release_id"][:16] in verified.stdout
    metrics = json.loads((proj / "metrics/eval.json").read_text())
    assert metrics["release_id"] == manifest["release_id"]

    again = run(["dvc", "repro"], proj)
    reran = [line for line in again.stdout.splitlines() if line.startswith("Running stage")]
    assert reran == ["Running stage 'snapshot':"], again.stdout
