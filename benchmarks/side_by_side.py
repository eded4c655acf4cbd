"""Shared by the benchmarks that run this checkout against a baseline checkout: the best
of each tree's runs, their ratios, and the results file."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"

Run = Mapping[str, Any]


def summarise(
    result: dict[str, Any],
    runs: Mapping[str, Sequence[Run]],
    measures: Mapping[str, Callable[[Run], float]],
) -> dict[str, Any]:
    """Add each measure's smallest value per tree to ``result`` and, with a ``baseline``
    tree, the ratios current / baseline (``ratio_current_to_baseline``)."""
    best = {
        key: {name: min(get(r) for r in rs) for name, rs in runs.items()}
        for key, get in measures.items()
    }
    result.update(best)
    if "baseline" in runs and "current" in runs:
        result["ratio_current_to_baseline"] = {
            key: round(values["current"] / values["baseline"], 3) for key, values in best.items()
        }
    return result


def write(name: str, result: Mapping[str, Any]) -> None:
    """``benchmarks/out/<name>.json`` (sorted keys), also printed."""
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(text)
    print(text, end="")
