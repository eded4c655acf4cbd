"""The label vocabulary: one place for what label values mean everywhere.

Label volumes (the release's ``label`` datasets, the synthetic truth, the network's
output), SEG segments (numbers, labels and codes), the overlays of ``evaluate`` and
``predict`` and the card's montage and gallery all read their values, names, colours and
codes from here.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKGROUND, NORMAL, GGO, CONSOLIDATION = 0, 1, 2, 3
#: Classes of a label volume, background included.
N_CLASSES = 4
#: Local coding scheme for a concept without a widely used SNOMED CT code.
LOCAL_SCHEME = "99CTCURATE"

Coded = tuple[str, str, str]
"""A coded concept: (code value, coding scheme designator, code meaning)."""

ANATOMICAL_STRUCTURE: Coded = ("91723000", "SCT", "Anatomical Structure")
ALTERED_STRUCTURE: Coded = ("49755003", "SCT", "Morphologically Altered Structure")


@dataclass(frozen=True)
class Label:
    """One label value: its names, display colours and SEG codes."""

    value: int
    key: str  # machine name: the manifest's ``labels``
    name: str  # SEG SegmentLabel, legends
    short: str  # compact legend
    colour: str  # montage and gallery (hex)
    overlay_rgba: tuple[float, float, float, float]  # evaluate / predict overlays
    category: Coded  # SEG SegmentedPropertyCategoryCodeSequence
    property_type: Coded  # SEG SegmentedPropertyTypeCodeSequence


VOCABULARY: tuple[Label, ...] = (
    Label(
        NORMAL,
        "normal_lung",
        "normal lung",
        "normal lung",
        "#3b82f6",
        (0.0, 0.8, 0.0, 0.35),
        ANATOMICAL_STRUCTURE,
        ("39607008", "SCT", "Lung"),
    ),
    Label(
        GGO,
        "ggo",
        "ground-glass opacity",
        "GGO",
        "#f59e0b",
        (1.0, 0.9, 0.0, 0.6),
        ALTERED_STRUCTURE,
        ("GGO", LOCAL_SCHEME, "Ground-glass opacity"),
    ),
    Label(
        CONSOLIDATION,
        "consolidation",
        "consolidation",
        "consolidation",
        "#dc2626",
        (0.9, 0.0, 0.0, 0.6),
        ALTERED_STRUCTURE,
        ("95436008", "SCT", "Lung consolidation"),
    ),
)
#: Machine name → value, background included (the manifest's ``labels``).
KEYS: dict[str, int] = {"background": BACKGROUND, **{lab.key: lab.value for lab in VOCABULARY}}
#: Value → name: the SEG segment labels (the segment number is the label value).
NAMES: dict[int, str] = {lab.value: lab.name for lab in VOCABULARY}
#: Montage / gallery colours of values 1..3.
COLOURS: tuple[str, ...] = tuple(lab.colour for lab in VOCABULARY)
#: Overlay RGBA per value.
OVERLAY_RGBA: dict[int, tuple[float, float, float, float]] = {
    lab.value: lab.overlay_rgba for lab in VOCABULARY
}
