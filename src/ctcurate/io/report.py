"""Numbers of the stages' ``report.json`` files: ratios and floats to a fixed number of
decimals, so that reports are byte-identical across runs and machines."""

from __future__ import annotations

#: Decimals of the ratios and measures in a report.
REPORT_DIGITS = 6


def rounded(value: float | None) -> float | None:
    """``value`` to :data:`REPORT_DIGITS` decimals as a Python float (``None`` stays)."""
    return None if value is None else round(float(value), REPORT_DIGITS)


def ratio(num: int, den: int) -> float | None:
    """``num / den`` to :data:`REPORT_DIGITS` decimals; ``None`` when ``den`` is 0."""
    return round(num / den, REPORT_DIGITS) if den else None
