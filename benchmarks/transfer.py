"""Zero-shot transfer of the demo-trained pneumonia selector to a second synthetic generator.

The selector is trained on the default `ctcurate synth` archive (synth → snapshot → index →
select-audit-list → select-train, the `dvc.yaml` arguments) unless `--model` names one.
Then the phantom archive of `tests/phantom` (another anatomy, lesion and noise model, never
used to choose a ctcurate constant) goes through snapshot → index → select with that model,
and the selection is scored against the phantom's truth.

    PYTHONPATH=src .venv/bin/python benchmarks/transfer.py [--patients 36] [--model PATH]

Only the `ctcurate` command line is called, so the figures follow whatever the stages do.
Results: `<work>/transfer.json`, also printed (default work folder `benchmarks/out/transfer`;
a selector already trained there, `<work>/demo/select_model/selector.json`, is reused).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from phantom import PhantomParams, build_archive  # noqa: E402


def ctcurate(*args: str | Path) -> None:
    """Run one `ctcurate` command (the CLI of this checkout's interpreter)."""
    cmd = [sys.executable, "-m", "ctcurate", *map(str, args)]
    subprocess.run(cmd, check=True, cwd=ROOT)


def train_demo_selector(work: Path, params: Path) -> Path:
    """synth (default params) → snapshot → index → audit list → select-train."""
    demo = work / "demo"
    model = demo / "select_model" / "selector.json"
    if model.is_file():
        return model
    p = ["--params", params]
    ctcurate("synth", *p, "--out", demo / "synth")
    ctcurate("snapshot", *p, "--archive", demo / "synth/archive", "--out", demo / "listing.parquet")
    ctcurate(
        "index", *p, "--archive", demo / "synth/archive",
        "--snapshot", demo / "listing.parquet", "--out", demo / "index",
    )  # fmt: skip
    audit = demo / "select_audit" / "audit_list.csv"
    ctcurate("select-audit-list", *p, "--truth", demo / "synth/truth.parquet", "--out", audit)
    ctcurate(
        "select-train", *p, "--index", demo / "index", "--archive", demo / "synth/archive",
        "--audit-list", audit, "--out", model,
    )  # fmt: skip
    return model


def ratio(num: int, den: int) -> float | None:
    return round(num / den, 3) if den else None


def auc(pos: list[float], neg: list[float]) -> float | None:
    """Area under the ROC curve of the pneumonia score (ties count half)."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 3)


def score(series_path: Path, truth_path: Path, report_path: Path) -> dict[str, Any]:
    """Precision / recall of pneumonia-series selection against the phantom truth."""
    truth = {r["series_instance_uid"]: r for r in pq.read_table(truth_path).to_pylist()}
    rows = pq.read_table(series_path).to_pylist()
    tp = fp = fn = tn = 0
    surv_tp = surv_fp = surv_fn = 0
    rule_rejected: Counter[str] = Counter()
    by_pattern: dict[str, list[int]] = {}
    scores: dict[bool, list[float]] = {True: [], False: []}
    for r in rows:
        t = truth[r["series_instance_uid"]]
        positive, picked = bool(t["pneumonia"]), bool(r["selected"])
        tp += positive and picked
        fp += (not positive) and picked
        fn += positive and not picked
        tn += (not positive) and not picked
        if r["rule_reason"] is not None:
            rule_rejected[f"{r['rule_reason']} ({'pneumonia' if positive else 'negative'})"] += 1
        else:
            flagged = bool(r.get("pneumonia"))
            if r.get("pneumonia_score") is not None:
                scores[positive].append(float(r["pneumonia_score"]))
            surv_tp += positive and flagged
            surv_fp += (not positive) and flagged
            surv_fn += positive and not flagged
        key = f"{t['pattern']}/{t['variant']}"
        if t["pattern"] == "negative":
            key += " with atelectasis" if t["atelectasis"] else " without atelectasis"
        hit = by_pattern.setdefault(key, [0, 0])
        hit[0] += picked
        hit[1] += 1
    report = json.loads(report_path.read_text())
    return {
        "series": len(rows),
        "pneumonia_series": tp + fn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "rule_survivors": {
            "precision": ratio(surv_tp, surv_tp + surv_fp),
            "recall": ratio(surv_tp, surv_tp + surv_fn),
            "counts": {"tp": surv_tp, "fp": surv_fp, "fn": surv_fn},
            "auc": auc(scores[True], scores[False]),
        },
        "rule_rejections": dict(sorted(rule_rejected.items())),
        "selected_by_pattern": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_pattern.items())},
        "select_report": {
            k: report.get(k) for k in ("precision", "recall", "eligible_recall", "lung_mask")
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks/out/transfer")
    ap.add_argument("--model", type=Path, help="selector JSON (default: train on the demo)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--patients", type=int, default=36)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--matrix", type=int, nargs=2, default=(128, 192))
    ap.add_argument("--slices", type=int, nargs=2, default=(30, 48))
    ap.add_argument(
        "--patient-name", choices=("empty", "pseudonym"), default="empty",
        help="PatientName: empty, or == PatientID (needs an index PHI policy that allows it)",
    )  # fmt: skip
    args = ap.parse_args()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = args.model.resolve() if args.model else train_demo_selector(work, args.params)
    t_train = time.perf_counter() - t0

    ph = work / "phantom"
    params = PhantomParams(
        seed=args.seed,
        patients=args.patients,
        matrix=tuple(args.matrix),
        slices=tuple(args.slices),
        patient_name=args.patient_name,
        write_seg=True,
    )
    t1 = time.perf_counter()
    if ph.exists():
        shutil.rmtree(ph)
    build_archive(ph, params)
    t_build = time.perf_counter() - t1
    p = ["--params", args.params]
    t2 = time.perf_counter()
    ctcurate("snapshot", *p, "--archive", ph / "archive", "--out", ph / "listing.parquet")
    ctcurate(
        "index", *p, "--archive", ph / "archive", "--snapshot", ph / "listing.parquet",
        "--out", ph / "index",
    )  # fmt: skip
    ctcurate(
        "select", *p, "--index", ph / "index", "--rules", ROOT / "stages/select",
        "--archive", ph / "archive", "--model", model, "--seg", ph / "annotations/seg",
        "--truth", ph / "truth.parquet", "--out", ph / "select",
    )  # fmt: skip
    t_select = time.perf_counter() - t2
    result = score(ph / "select/series.parquet", ph / "truth.parquet", ph / "select/report.json")
    result["phantom"] = {
        "seed": args.seed,
        "patients": args.patients,
        "matrix": list(args.matrix),
        "slices": list(args.slices),
        "patient_name": args.patient_name,
    }
    result["seconds"] = {
        "train": round(t_train, 1),
        "build": round(t_build, 1),
        "index_select": round(t_select, 1),
    }
    (work / "transfer.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
