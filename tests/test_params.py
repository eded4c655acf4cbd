"""params.yaml validation: unknown keys and out-of-range values fail with the key named."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctcurate.errors import ParamsError
from ctcurate.models.nets import shape_multiple, unet_config
from ctcurate.params import (
    EvaluateParams,
    IndexParams,
    PackParams,
    Params,
    SelectParams,
    TrainParams,
    load_params,
    load_section,
)
from ctcurate.pipeline.train import training_patch

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.select.pandemic_start.isoformat() == "2020-01-01"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields), "one params section per stage"


@pytest.mark.parametrize("name", ["large.yaml", "whole_lung_gpu.yaml"])
def test_profile_merges_into_valid_params(name: str, tmp_path: Path) -> None:
    """A profile of stages/profiles holds only known keys and fits the U-Net it asks for."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = yaml.safe_load((ROOT / "stages" / "profiles" / name).read_text())
    for section, values in profile.items():
        assert section in raw, f"profile section {section!r} is not a stage"
        raw[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    multiple = shape_multiple(unet_config(params.train.channels, params.train.num_res_units))
    assert all(side % multiple == 0 for side in params.pack.shape)
    assert params.train.patch is not None
    # train's own check: a multiple of the stride on every side, and not clipped by the volume
    patch = training_patch(params.train, params.pack.shape, multiple, path)
    assert patch == tuple(params.train.patch)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("select:\n  min_slice: 10\n")
    with pytest.raises(ParamsError, match=r"unknown key 'select\.min_slice'"):
        load_section(path, "select", SelectParams)


def test_out_of_range_value_is_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("select:\n  min_slices: -3\n")
    with pytest.raises(ParamsError, match=r"bad value for 'select\.min_slices'"):
        load_section(path, "select", SelectParams)


def test_cross_field_check(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("pack:\n  split_fractions: [0.5, 0.2, 0.2]\n")
    with pytest.raises(ParamsError, match="split_fractions must sum to 1"):
        load_section(path, "pack", PackParams)


@pytest.mark.parametrize(
    ("text", "name", "model", "match"),
    [
        # int16 volumes: -40000 would wrap to +25536 HU in the padding
        ("pack:\n  hu_min: -40000\n", "pack", PackParams, r"'pack\.hu_min': .* -32768"),
        ("pack:\n  hu_max: 32768\n", "pack", PackParams, r"'pack\.hu_max': .* 32767"),
        (
            "evaluate:\n  hu_lung_max: -40000\n",
            "evaluate",
            EvaluateParams,
            r"'evaluate\.hu_lung_max'",
        ),
        # no float may be infinite or NaN
        (
            "pack:\n  spacing_mm: [.inf, 4, 4]\n",
            "pack",
            PackParams,
            r"'pack\.spacing_mm\.0': .*finite",
        ),
        ("select:\n  threshold: .nan\n", "select", SelectParams, r"'select\.threshold': .*finite"),
        ("train:\n  lr: .inf\n", "train", TrainParams, r"'train\.lr': .*finite"),
        ("index:\n  timeout_s: .nan\n", "index", IndexParams, r"'index\.timeout_s': .*finite"),
        (
            "train:\n  min_lesion_mm3: [0, .inf]\n",
            "train",
            TrainParams,
            r"'train\.min_lesion_mm3\.1'",
        ),
        # shapes and spacings: bounded, never zero or negative
        ("pack:\n  shape: [0, 64, 64]\n", "pack", PackParams, r"'pack\.shape\.0'"),
        ("pack:\n  shape: [48, 2048, 64]\n", "pack", PackParams, r"'pack\.shape\.1'"),
        ("pack:\n  shape: [1024, 1024, 1024]\n", "pack", PackParams, r"'pack\.shape': .*voxels"),
        ("pack:\n  spacing_mm: [4, 0.001, 4]\n", "pack", PackParams, r"'pack\.spacing_mm\.1'"),
        ("train:\n  patch: [32, 64, 4096]\n", "train", TrainParams, r"'train\.patch\.2'"),
        # DuckDB below the memory the index build needs
        (
            "index:\n  duckdb_memory_mb: 16\n",
            "index",
            IndexParams,
            r"'index\.duckdb_memory_mb': .* 64",
        ),
    ],
)
def test_values_that_cannot_work_are_named(
    tmp_path: Path, text: str, name: str, model: type[Any], match: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(
        ParamsError, match=r"^" + re.escape(str(path)) + r": bad value for " + match
    ):
        load_section(path, name, model)


def test_unknown_section_fails_every_load(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("indx:\n  workers: 4\nselect:\n  min_slices: 10\n")
    for name, model in (("select", SelectParams), ("index", IndexParams), ("pack", PackParams)):
        with pytest.raises(ParamsError, match=r"unknown key 'indx' \(not a params section\)"):
            load_section(path, name, model)
    with pytest.raises(ParamsError, match=r"unknown key 'indx'"):
        load_params(path)


def test_cli_unknown_section_exits_nonzero_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctcurate import cli

    params = tmp_path / "params.yaml"
    params.write_text("snapshot:\n  ignore: []\nsnapshott: {}\n")
    (tmp_path / "archive").mkdir()
    argv = ["ctcurate", "snapshot", "--params", str(params), "--archive", str(tmp_path / "archive")]
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(tmp_path / "listing.parquet")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == ParamsError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ctcurate: error: {params}: unknown key 'snapshott' (not a params section)"]
    assert not (tmp_path / "listing.parquet").exists()


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("select:\n  min_slices: [1,\n")
    with pytest.raises(ParamsError, match=r"params\.yaml:\d+: not valid YAML"):
        load_section(path, "select", SelectParams)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "select", SelectParams)


def test_cli_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("snapshot:\n  ignored: []\n")
    (tmp_path / "archive").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctcurate",
            "snapshot",
            "--params",
            str(params),
            "--archive",
            str(tmp_path / "archive"),
            "--out",
            str(tmp_path / "listing.parquet"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"ctcurate: error: {params}: unknown key 'snapshot.ignored'"]
    assert not (tmp_path / "listing.parquet").exists()
