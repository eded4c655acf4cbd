"""Logging and progress.

Log lines carry stage tags and counts, never DICOM header values. Progress is a rich bar
on a terminal and periodic log lines otherwise (DVC runs stages without a TTY).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_FORMAT = "%(levelname)s ctcurate.%(name)s: %(message)s"


def get_logger(stage: str) -> logging.Logger:
    """Return the logger of one stage (its name is the tag on every line)."""
    logger = logging.getLogger(stage)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def progress(
    items: Iterable[T],
    total: int,
    label: str,
    logger: logging.Logger,
    unit: str = "files",
    every_s: float = 10.0,
) -> Iterator[T]:
    """Yield ``items`` while showing progress with a rate (``unit``/s).

    On a terminal a rich progress bar is drawn; otherwise one log line every ``every_s``
    seconds and one at the end. Only counts are logged.
    """
    start = time.monotonic()
    if sys.stderr.isatty() and total > 0:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8.0f} " + unit + "/s"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(label, total=total, rate=0.0)
            for done, item in enumerate(items, start=1):
                yield item
                rate = done / max(time.monotonic() - start, 1e-9)
                bar.update(task, advance=1, rate=rate)
    else:
        last = start
        for done, item in enumerate(items, start=1):
            yield item
            now = time.monotonic()
            if now - last >= every_s:
                rate = done / max(now - start, 1e-9)
                logger.info("%s: %d/%d %s (%.0f %s/s)", label, done, total, unit, rate, unit)
                last = now
    elapsed = max(time.monotonic() - start, 1e-9)
    logger.info("%s: done, %d %s in %.1f s", label, total, unit, elapsed)
