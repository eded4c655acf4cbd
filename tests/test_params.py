"""params.yaml validation: unknown keys and out-of-range values fail with the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctcurate.errors import ParamsError
from ctcurate.nets import shape_multiple, unet_config
from ctcurate.params import PackParams, Params, SelectParams, load_params, load_section
from ctcurate.train import training_patch

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.select.pandemic_start.isoformat() == "2020-01-01"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields), "one params section per stage"


def test_large_profile_merges_into_valid_params(tmp_path: Path) -> None:
    """stages/profiles/large.yaml holds only known keys and fits the U-Net it asks for."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = yaml.safe_load((ROOT / "stages" / "profiles" / "large.yaml").read_text())
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
