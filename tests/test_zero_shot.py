"""The metrics of ``benchmarks/zero_shot.py`` (the zero-shot figures in docs/models.md):
Dice and typicality accuracy on known cases, and truth and prediction compared instance by
instance on two tiny phantom series."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.train import make_release, tiny_params
from phantom import PhantomParams, build_archive

from ctcurate.dicom.seg import read_seg_labels
from ctcurate.pipeline import predict, train

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zero_shot", ROOT / "benchmarks" / "zero_shot.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _truth() -> np.ndarray:
    truth = np.zeros((6, 8, 8), dtype=np.uint8)
    truth[1:5, 1:7, 1:4] = 1
    truth[1:5, 1:7, 5:7] = 1
    truth[2:4, 2:4, 2:3] = 2
    truth[2:4, 5:6, 5:7] = 3
    return truth


def test_dice_and_accuracy_on_known_cases() -> None:
    zs = _bench()
    truth = _truth()
    same = zs.score_series(truth, truth, 0.9, 0.5, 1)
    assert same["lung_dice"] == 1.0
    assert same["lesion_dice"] == 1.0
    assert same["typicality_correct"] == 1
    empty = zs.score_series(np.zeros_like(truth), truth, 0.2, 0.5, 1)
    assert empty["lung_dice"] == 0.0
    assert empty["lesion_dice"] == 0.0
    assert empty["typicality_correct"] == 0
    # half the lesion found, all called lung: lesion Dice 2·h / (h + 2h)
    half = truth.copy()
    half[truth >= 2] = 1
    half[2:4, 2:4, 2:3] = 2
    h, total = int((half >= 2).sum()), int((truth >= 2).sum())
    assert zs.score_series(half, truth, 0.5, 0.5, 0)["lesion_dice"] == pytest.approx(
        2 * h / (h + total)
    )
    # no lesion in the truth: no lesion Dice; no binary truth: no accuracy
    lung_only = np.minimum(truth, 1)
    none = zs.score_series(truth, lung_only, 0.7, 0.5, None)
    assert none["lesion_dice"] is None
    assert none["typicality_correct"] is None
    rows = [
        {"pattern": "typical", **same},
        {"pattern": "typical", **empty},
        {"pattern": "negative", **none},
    ]
    agg = zs.by_pattern(rows)
    assert agg["typical"]["lung_dice"] == 0.5
    assert agg["typical"]["typicality_accuracy"] == 0.5
    assert agg["all"]["n_typicality"] == 2
    assert agg["all"]["n_lesion"] == 2
    assert agg["negative"]["lesion_dice"] is None
    assert "atypical" not in agg
    with pytest.raises(ValueError, match="shapes differ"):
        zs.score_series(truth[:3], truth, 0.5, 0.5, 1)


@pytest.mark.slow
def test_truth_and_prediction_meet_on_the_series_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tiny phantom series through a tiny model: the metrics are in range; a prediction
    replaced by the truth SEG (read back in instance order) scores exactly 1.0."""
    zs = _bench()
    models = tmp_path / "models"
    train.run(make_release(tmp_path / "release", n_cases=8), models, tmp_path / "live",
              tiny_params(epochs=1))  # fmt: skip
    ph = tmp_path / "phantom"
    params = PhantomParams(
        seed=3, patients=2, pneumonia_share=1.0, matrix=(32, 48), slices=(8, 12), write_seg=True
    )
    build_archive(ph, params)
    rows = pq.read_table(ph / "truth.parquet").to_pylist()
    yaml = tmp_path / "params.yaml"
    # wide enough in-plane to reach the lungs on either side of the mediastinum
    yaml.write_text(
        "pack:\n  spacing_mm: [4.0, 4.0, 4.0]\n  shape: [16, 48, 48]\n"
        "evaluate:\n  device: cpu\n  threads: 1\n"
    )
    scored = zs.predict_archive(ph, rows, models, yaml)
    assert len(scored) == 2
    for r in scored:
        assert 0.0 <= r["lung_dice"] <= 1.0
        assert 0.0 < r["lung_in_grid"] <= 1.0
        assert r["typical"] in (0, 1)

    real = predict.predict_series

    def truth_as_prediction(datasets: Any, *args: Any, **kwargs: Any) -> Any:
        pred = real(datasets, *args, **kwargs)
        uid = str(datasets[0].SeriesInstanceUID)
        sops = [str(ds.SOPInstanceUID) for ds in datasets]
        truth = read_seg_labels(ph / "annotations" / "seg" / f"{uid}.dcm", sops)
        return dataclasses.replace(pred, instance_labels=truth)

    monkeypatch.setattr(predict, "predict_series", truth_as_prediction)
    perfect = zs.predict_archive(ph, rows, models, yaml)
    assert [r["lung_dice"] for r in perfect] == [1.0, 1.0]
    assert [r["lesion_dice"] for r in perfect] == [1.0, 1.0]
