"""Tests of the evaluate stage on a tiny release and a tiny trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.train import make_case, make_release, sha256_tree, tiny_params

from ctcurate.errors import InputError, ParamsError
from ctcurate.imaging import overlay
from ctcurate.imaging.lungmask import threshold_lung_mask
from ctcurate.io.outputs import MARKER
from ctcurate.models import nets
from ctcurate.models.metrics import dice
from ctcurate.params import EvaluateParams
from ctcurate.pipeline import evaluate, train

METRIC_KEYS = {
    "n_test",
    "n_typicality",
    "n_consolidated",
    "lung_dice",
    "lesion_dice",
    "ggo_dice",
    "consolidation_dice",
    "typicality_accuracy",
    "typicality_balanced_accuracy",
    "typicality_auc",
    "sensitivity",
    "specificity",
    "lung_dice_consolidated",
    "threshold_lung_dice_consolidated",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trained")
    # 12 cases: splits cycle train/train/val/test, so the test split holds 3 cases
    release = make_release(root / "release", n_cases=12)
    train.run(release, root / "models", root / "live", tiny_params(epochs=3))
    return release, root / "models"


def _run(release: Path, models: Path, out: Path, **kw: object) -> tuple[dict[str, object], Path]:
    params = EvaluateParams.model_validate({"device": "cpu", "threads": 1} | kw)
    evaluate.run(release, models, out / "metrics" / "eval.json", out / "plots", params)
    return json.loads((out / "metrics" / "eval.json").read_text()), out / "plots"


def test_outputs_schema(trained: tuple[Path, Path], tmp_path: Path) -> None:
    release, models = trained
    report, plots = _run(release, models, tmp_path)
    assert set(report) >= METRIC_KEYS
    assert report["n_test"] == 3
    assert report["threshold"] == 0.5
    per_site = report["per_site"]
    assert isinstance(per_site, dict)
    assert sorted(per_site) == ["H01", "H02"]
    assert sum(s["n_test"] for s in per_site.values()) == 3
    for site in per_site.values():
        assert set(site) >= METRIC_KEYS
    for key in METRIC_KEYS - {"n_test", "n_typicality", "n_consolidated"}:
        value = report[key]
        assert value is None or (isinstance(value, float) and 0.0 <= value <= 1.0), key
    confusion = json.loads((plots / "confusion.json").read_text())["confusion"]
    assert len(confusion) == report["n_typicality"]
    assert {r["actual"] for r in confusion} <= {"typical", "atypical_or_negative"}
    assert [r["case_id"] for r in confusion] == sorted(r["case_id"] for r in confusion)
    roc = json.loads((plots / "roc.json").read_text())["roc"]
    if report["typicality_auc"] is None:
        assert roc == []
    else:
        assert roc[0] == {"fpr": 0.0, "tpr": 0.0, "threshold": None}
        assert roc[-1]["fpr"] == 1.0
        assert roc[-1]["tpr"] == 1.0
    pngs = sorted(p.name for p in (plots / "overlays").iterdir())
    assert pngs == ["case003.png", "case007.png", "case011.png"]
    assert (plots / "overlays" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_is_deterministic(trained: tuple[Path, Path], tmp_path: Path) -> None:
    release, models = trained
    _run(release, models, tmp_path / "a", max_overlays=1)
    _run(release, models, tmp_path / "b", max_overlays=1)
    first = sha256_tree(tmp_path / "a")
    assert first == sha256_tree(tmp_path / "b")
    assert sorted(first) == [
        "metrics/eval.json",
        f"plots/{MARKER}",
        "plots/confusion.json",
        "plots/overlays/case003.png",
        "plots/roc.json",
    ]


def test_missing_models(trained: tuple[Path, Path], tmp_path: Path) -> None:
    release, _ = trained
    with pytest.raises(InputError, match=r"model\.json: missing"):
        _run(release, tmp_path / "none", tmp_path)
    assert not (tmp_path / "plots").exists()


def test_cuda_requested_without_cuda(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    release, models = trained
    with pytest.raises(ParamsError, match=r"evaluate\.device is 'cuda'"):
        _run(release, models, tmp_path, device="cuda")


def test_threshold_mask_loses_consolidation() -> None:
    rng = np.random.default_rng(3)
    image, label = make_case(rng, (24, 32, 32), "negative")
    clear = dice(threshold_lung_mask(image.astype(np.float32), -400), label > 0)
    assert clear is not None
    assert clear > 0.95
    image, label = make_case(rng, (24, 32, 32), "typical")  # consolidation at the lung edge
    mask = threshold_lung_mask(image.astype(np.float32), -400)
    hidden = dice(mask, label > 0)
    assert hidden is not None
    assert hidden < clear
    assert not mask[label == 3].all()
    assert not threshold_lung_mask(np.full((4, 8, 8), -1000.0), -400).any()


def _result(case_id: str, site: str, typical: int, prob: float) -> evaluate.CaseResult:
    return evaluate.CaseResult(case_id, site, typical, prob, 0.9, None, None, None, False, None)


def test_summaries_by_hand() -> None:
    results = [
        _result("c", "A", 1, 0.8),
        _result("a", "A", 0, 0.6),
        _result("b", "B", 1, 0.4),
        _result("d", "B", -1, 0.9),
    ]
    report = evaluate.eval_metrics(results, 0.5, "rid")
    # known cases: c (1, 0.8 → typical), a (0, 0.6 → typical), b (1, 0.4 → other)
    assert report["n_test"] == 4
    assert report["n_typicality"] == 3
    assert report["typicality_accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert report["sensitivity"] == 0.5
    assert report["specificity"] == 0.0
    assert report["typicality_balanced_accuracy"] == 0.25
    # pairs (pos, neg): (0.8, 0.6) = 1, (0.4, 0.6) = 0 → 0.5
    assert report["typicality_auc"] == 0.5
    assert report["lung_dice"] == 0.9
    assert report["lesion_dice"] is None
    assert report["lung_dice_consolidated"] is None
    assert report["per_site"]["B"]["typicality_auc"] is None
    assert report["per_site"]["B"]["specificity"] is None
    confusion = evaluate.confusion_plot(results, 0.5)["confusion"]
    assert [r["case_id"] for r in confusion] == ["a", "b", "c"]
    assert confusion[0] == {
        "case_id": "a",
        "actual": "atypical_or_negative",
        "predicted": "typical",
    }


def test_overlay_png_deterministic() -> None:
    rng = np.random.default_rng(0)
    image, label = make_case(rng, (16, 24, 24), "typical")
    hu = image.astype(np.float32)
    assert overlay.overlay_slice(label) == int(np.argmax((label >= 2).sum(axis=(1, 2))))
    first = evaluate.overlay_png(hu, label, label, "x")
    assert first == evaluate.overlay_png(hu, label, label, "x")
    assert first != evaluate.overlay_png(hu, label, np.zeros_like(label), "x")
    assert b"Software" not in first


def _with_postprocess(models: Path, dest: Path, **changes: Any) -> Path:
    """A copy of ``models`` at ``dest`` whose card's ``postprocess`` has ``changes``
    (a value of ``None`` removes the entry, as in a card from before it existed)."""
    shutil.copytree(models, dest)
    card = json.loads((dest / "model.json").read_text())
    for key, value in changes.items():
        if value is None:
            card["postprocess"].pop(key, None)
        else:
            card["postprocess"][key] = value
    (dest / "model.json").write_text(json.dumps(card))
    return dest


def test_lesion_growth_of_the_model_card_is_applied(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, models = trained
    grown = _with_postprocess(models, tmp_path / "models", lesion_grow_mm=6.5)
    reaches: list[float] = []
    real = nets.grow_lesions

    def spy(label: Any, hu: Any, spacing: Any, reach_mm: float) -> Any:
        reaches.append(reach_mm)
        return real(label, hu, spacing, reach_mm)

    monkeypatch.setattr(nets, "grow_lesions", spy)
    report, _ = _run(release, grown, tmp_path / "grown", max_overlays=0)
    assert reaches == [6.5] * report["n_test"]
    old = _with_postprocess(grown, tmp_path / "old_models", lesion_grow_mm=None)
    reaches.clear()  # a card from before the growth: none
    _run(release, old, tmp_path / "old", max_overlays=0)
    assert reaches == [0.0] * report["n_test"]


def test_lesion_cut_of_the_model_card_is_applied(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, models = trained
    # the lung as the network draws it (with the lung from HU, a removed lesion outside the
    # aerated lung would leave the lung, and the lung Dice below would move)
    plain = _with_postprocess(models, tmp_path / "plain", lung_from="network")
    base, _ = _run(release, plain, tmp_path / "base", max_overlays=0)
    # larger than any lung: no lesion is kept
    cut = _with_postprocess(plain, tmp_path / "models", min_lesion_mm3=1e12)
    calls: list[tuple[float, int, int]] = []
    real = nets.remove_small_lesions

    def spy(label: Any, min_mm3: float, spacing: Any) -> Any:
        out = real(label, min_mm3, spacing)
        calls.append((min_mm3, int((label >= 2).sum()), int((out >= 2).sum())))
        return out

    monkeypatch.setattr(nets, "remove_small_lesions", spy)
    report, _ = _run(release, cut, tmp_path / "cut", max_overlays=0)
    assert [c[0] for c in calls] == [1e12] * report["n_test"]
    assert all(after == 0 for _, _, after in calls)
    assert report["lung_dice"] == base["lung_dice"]  # a removed lesion stays lung
    for key in ("lesion_dice", "ggo_dice", "consolidation_dice"):
        assert report[key] in (0.0, None), key
