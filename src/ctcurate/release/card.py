"""The dataset card shipped with every release: ``card.md``, ``card/montage.png`` and the
same card as a page, ``card.html`` with its gallery ``card/gallery/*.png``
(:mod:`ctcurate.release.card_html`).

The card counts the cohort by site, era, vendor, label and slice thickness, and audits
shortcuts: how well one acquisition attribute alone (site, vendor, study year) predicts the
typicality label. A rule that predicts each group's majority label scoring well above the
overall majority baseline means a model can learn the hospital instead of the disease.
Everything here depends only on its inputs, so the card's bytes are reproducible.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctcurate import labels
from ctcurate.io.atomic import write_bytes
from ctcurate.release import card_html
from ctcurate.release.format import MetaValue

CARD = "card.md"
CARD_DIR = "card"
MONTAGE = "montage.png"
#: An attribute whose majority rule beats the baseline by more than this is flagged.
SHORTCUT_LIFT = 0.10
#: Cases shown in the montage per label value.
MONTAGE_PER_LABEL = 4
#: HU window of the montage (lung window).
MONTAGE_WINDOW = (-1000.0, 400.0)
#: Overlay colours of label values 1..3 (normal lung, GGO, consolidation): the montage's
#: and the gallery's.
LABEL_COLOURS = labels.COLOURS
#: Cases in the gallery of ``card.html`` unless the pack params say otherwise.
GALLERY_MAX_CASES = 500
LABEL_NOTE = (
    "Label: typical = 1 for consensus RSNA grades 1-2 (typical / indeterminate), "
    "0 for grades 3-4 (atypical / negative)."
)

Rows = Sequence[Mapping[str, MetaValue]]
LoadCase = Callable[[str], tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]]

#: (card heading, key in the case metadata) of the count tables.
GROUPINGS = (
    ("split", "split"),
    ("site", "site"),
    ("era", "era"),
    ("cohort", "cohort"),
    ("vendor", "manufacturer"),
    ("slice thickness (mm)", "slice_thickness_mm"),
    ("study year", "study_year"),
)
#: (card name, metadata key) of the attributes audited as shortcuts.
SHORTCUTS = (("site", "site"), ("vendor", "manufacturer"), ("study year", "study_year"))


def group_value(value: MetaValue) -> str:
    """A metadata value as a group name (``unknown`` for missing)."""
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def count_table(rows: Rows, key: str) -> list[tuple[str, int, int, int]]:
    """(group, non-typical cases, typical cases, total) per value of ``key``, sorted."""
    table: dict[str, list[int]] = {}
    for row in rows:
        counts = table.setdefault(group_value(row.get(key)), [0, 0])
        counts[1 if row.get("typical") == 1 else 0] += 1
    return [(g, c[0], c[1], c[0] + c[1]) for g, c in sorted(table.items())]


def shortcut_audit(rows: Rows, key: str) -> dict[str, Any]:
    """How well the majority label of each ``key`` group predicts the label.

    Returns ``groups``, ``accuracy`` of the per-group majority rule (in-sample, ties go to
    the overall majority label), ``baseline`` (accuracy of always predicting the overall
    majority label) and ``lift`` = accuracy - baseline.
    """
    labels = [1 if r.get("typical") == 1 else 0 for r in rows]
    if not labels:
        return {"groups": 0, "accuracy": 0.0, "baseline": 0.0, "lift": 0.0}
    overall = Counter(labels)
    majority = 1 if overall[1] > overall[0] else 0
    by_group: dict[str, Counter[int]] = {}
    for row, label in zip(rows, labels, strict=True):
        by_group.setdefault(group_value(row.get(key)), Counter())[label] += 1
    correct = 0
    for counts in by_group.values():
        if counts[0] == counts[1]:
            correct += counts[majority]
        else:
            correct += max(counts[0], counts[1])
    accuracy = correct / len(labels)
    baseline = overall[majority] / len(labels)
    return {
        "groups": len(by_group),
        "accuracy": round(accuracy, 4),
        "baseline": round(baseline, 4),
        "lift": round(accuracy - baseline, 4),
    }


def summary_line(rows: Rows, excluded: Sequence[Mapping[str, str]]) -> str:
    """The card's first sentence: cases packed (by label) and excluded."""
    typical = sum(1 for r in rows if r.get("typical") == 1)
    return (
        f"{len(rows)} cases packed "
        f"({typical} typical, {len(rows) - typical} non-typical), {len(excluded)} excluded."
    )


def label_table(rows: Rows) -> list[tuple[str, int, int, int]]:
    """(label, non-typical, typical, total) rows of the cases by label."""
    typical = sum(1 for r in rows if r.get("typical") == 1)
    other = len(rows) - typical
    return [("non-typical (0)", other, 0, other), ("typical (1)", 0, typical, typical)]


def render_card(rows: Rows, excluded: Sequence[Mapping[str, str]]) -> str:
    """The markdown text of the dataset card."""
    lines = [
        "# Dataset card",
        "",
        summary_line(rows, excluded),
        "The release id and this card's sha256 are in `manifest.json`.",
        "",
        "Label: `typical` = 1 for consensus RSNA grades 1-2 (typical / indeterminate),",
        "0 for grades 3-4 (atypical / negative).",
        "",
        "## Shortcut audit",
        "",
        "Accuracy of predicting the label from one attribute alone (majority label per",
        "group, in-sample) against always predicting the overall majority label. A large",
        f"lift (> {SHORTCUT_LIFT:.2f}) means a model could score by recognising the attribute",
        "instead of the disease.",
        "",
        "| attribute | groups | accuracy | baseline | lift | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, key in SHORTCUTS:
        audit = shortcut_audit(rows, key)
        flag = "**shortcut risk**" if audit["lift"] > SHORTCUT_LIFT else ""
        lines.append(
            f"| {name} | {audit['groups']} | {audit['accuracy']:.3f} | "
            f"{audit['baseline']:.3f} | {audit['lift']:+.3f} | {flag} |"
        )
    for heading, key in GROUPINGS:
        lines += [
            "",
            f"## Cases by {heading}",
            "",
            f"| {heading} | non-typical | typical | total |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {g} | {n0} | {n1} | {n} |" for g, n0, n1, n in count_table(rows, key)]
    reasons = Counter(e["reason"] for e in excluded)
    lines += ["", "## Excluded cases", "", "| reason | cases |", "|---|---:|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(reasons.items())]
    lines += [
        "",
        "## Example cases",
        "",
        f"![montage]({CARD_DIR}/{MONTAGE})",
        "",
        "Middle slice of each case (lung window) with the label overlay: blue normal lung,",
        "orange ground-glass opacity, red consolidation.",
        "",
    ]
    return "\n".join(lines)


def montage_cases(rows: Rows) -> list[str]:
    """Case ids shown in the montage: the first few by case id of each label value."""
    chosen: list[str] = []
    for label in (1, 0):
        ids = sorted(str(r["case_id"]) for r in rows if r.get("typical") == label)
        chosen += ids[:MONTAGE_PER_LABEL]
    return chosen


def render_montage(
    cases: Sequence[tuple[str, int, npt.NDArray[np.int16], npt.NDArray[np.uint8]]],
) -> bytes:
    """PNG bytes of the middle slices of ``(case_id, typical, image, label)`` with overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cols = min(MONTAGE_PER_LABEL, max(len(cases), 1))
    nrows = max(1, -(-len(cases) // cols))
    overlay = ListedColormap(list(LABEL_COLOURS))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.4 * nrows), squeeze=False)
    try:
        for ax in axes.ravel():
            ax.axis("off")
        for ax, (case_id, typical, image, label) in zip(axes.ravel(), cases, strict=False):
            mid = image.shape[0] // 2
            ax.imshow(image[mid], cmap="gray", vmin=MONTAGE_WINDOW[0], vmax=MONTAGE_WINDOW[1])
            masked = np.ma.masked_equal(label[mid].astype(np.int16), 0)
            ax.imshow(masked, cmap=overlay, vmin=1, vmax=3, alpha=0.4, interpolation="nearest")
            ax.set_title(f"{case_id[:10]}  typical={typical}", fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def write_card(
    release_dir: Path,
    rows: Rows,
    excluded: Sequence[Mapping[str, str]],
    load_case: LoadCase,
    gallery_max_cases: int = GALLERY_MAX_CASES,
) -> None:
    """Write ``card.md``, ``card/montage.png``, ``card.html`` and the gallery thumbnails
    ``card/gallery/*.png`` (at most ``gallery_max_cases``, see
    :func:`ctcurate.release.card_html.gallery_cases`) into ``release_dir``."""
    release_dir = Path(release_dir)
    write_bytes(release_dir / CARD, render_card(rows, excluded).encode("utf-8"))
    typical = {str(r["case_id"]): 1 if r.get("typical") == 1 else 0 for r in rows}
    shown = [(cid, typical[cid], *load_case(cid)) for cid in montage_cases(rows)]
    write_bytes(release_dir / CARD_DIR / MONTAGE, render_montage(shown))
    by_id = {str(r["case_id"]): r for r in rows}
    tiles = [
        _write_thumbnail(release_dir, by_id[cid], *load_case(cid))
        for cid in card_html.gallery_cases(rows, gallery_max_cases)
    ]
    page = render_html(rows, excluded, tiles)
    write_bytes(release_dir / card_html.HTML, page.encode("utf-8"))


def _spacing_yx(row: Mapping[str, MetaValue]) -> tuple[float, float]:
    spacing = row.get("spacing_mm")
    if isinstance(spacing, list) and len(spacing) == 3:
        return float(spacing[1]), float(spacing[2])
    return 1.0, 1.0


def _write_thumbnail(
    release_dir: Path,
    row: Mapping[str, MetaValue],
    image: npt.NDArray[np.int16],
    label: npt.NDArray[np.uint8],
) -> card_html.Tile:
    """Write one case's gallery thumbnail; its :class:`~ctcurate.release.card_html.Tile`."""
    case_id = str(row["case_id"])
    z = card_html.gallery_slice(label)
    rgb = card_html.render_thumbnail(
        image, label, z, _spacing_yx(row), MONTAGE_WINDOW, LABEL_COLOURS
    )
    src = f"{CARD_DIR}/{card_html.GALLERY_DIR}/{card_html.thumbnail_name(case_id)}"
    write_bytes(release_dir / src, card_html.png_bytes(rgb))
    return card_html.Tile(
        case_id=case_id,
        site=group_value(row.get("site")),
        split=group_value(row.get("split")),
        typical=1 if row.get("typical") == 1 else 0,
        slice_index=z,
        src=src,
        height=int(rgb.shape[0]),
        width=int(rgb.shape[1]),
    )


def render_html(
    rows: Rows, excluded: Sequence[Mapping[str, str]], tiles: Sequence[card_html.Tile]
) -> str:
    """The text of ``card.html``: what ``card.md`` holds, the label counts and the gallery."""
    audits = []
    for name, key in SHORTCUTS:
        audit = shortcut_audit(rows, key)
        audits.append(
            card_html.Audit(
                name=name,
                groups=int(audit["groups"]),
                accuracy=float(audit["accuracy"]),
                baseline=float(audit["baseline"]),
                lift=float(audit["lift"]),
                flagged=audit["lift"] > SHORTCUT_LIFT,
            )
        )
    sections = [card_html.Section("label", label_table(rows))]
    sections += [card_html.Section(h, count_table(rows, key)) for h, key in GROUPINGS]
    return card_html.render_html(
        summary=summary_line(rows, excluded),
        label_note=LABEL_NOTE,
        lift_threshold=SHORTCUT_LIFT,
        audits=audits,
        sections=sections,
        excluded=dict(Counter(e["reason"] for e in excluded)),
        tiles=tiles,
        packed=len(rows),
        colours=LABEL_COLOURS,
        montage=f"{CARD_DIR}/{MONTAGE}",
    )
