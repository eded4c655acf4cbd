"""Report numbers: fixed decimals, ``None`` for an empty denominator."""

from __future__ import annotations

import numpy as np

from ctcurate.io.report import REPORT_DIGITS, ratio, rounded


def test_ratio_rounds_and_has_no_value_without_a_denominator() -> None:
    assert ratio(1, 3) == round(1 / 3, REPORT_DIGITS) == 0.333333
    assert ratio(2, 2) == 1.0
    assert ratio(5, 0) is None


def test_rounded_gives_plain_floats() -> None:
    value = rounded(np.float64(0.12345678))
    assert value == 0.123457
    assert type(value) is float
    assert rounded(None) is None
