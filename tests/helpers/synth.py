"""Parameters of the smallest synthetic archive the tests generate (``tiny_archive``)."""

from __future__ import annotations

import datetime as dt

from ctcurate.params import SynthParams

#: 6 patients, 32² slices: the archive whose traps, anatomy and annotations test_synth checks.
TINY_ARCHIVE = SynthParams(patients=6, seed=11, matrix=32, pandemic_start=dt.date(2020, 3, 1))
