"""Annotation CSV files: row schemas and the hygiene rules of RELIABILITY.md 18.

A file is read as UTF-8 (a byte-order mark is accepted), its separator (``,`` or ``;``) is
told from the header line, every field is stripped of surrounding whitespace, and column
names are matched case-insensitively (extra columns are ignored). A file that cannot be
read as a whole — not UTF-8, a NUL byte, no header, a required column missing, a column
named twice — raises :class:`~ctcurate.errors.InputError` naming ``file:line``. Error
messages and reject details name the file, line and column, never a cell's content (a
header-less file's first row is data). Every other problem is a row-level :class:`Reject`
with the row's line number and a reason code:

``wrong_field_count``, ``duplicate_row`` (an exact copy of an earlier row; the first copy
is kept), ``missing_value``, ``bad_date`` (not ``YYYY-MM-DD`` or not a calendar date),
``ambiguous_date`` (``01/02/2020``-like: day and month cannot be told apart),
``bad_result`` (not ``positive`` / ``negative``), ``bad_grade`` (not an integer written
in ASCII digits: ``２`` or ``٣`` are refused), ``grade_out_of_range`` (an integer outside
1–4). Dates take ASCII digits only as well. Reader ids are case-normalised (upper case:
``r01`` and ``R01`` are one reader).
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from ctcurate.errors import InputError

# ASCII digits only: ``\d`` and int() also take other scripts' digits ('２', '٣')
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DAY_MONTH = re.compile(r"([0-9]{1,2})[./-]([0-9]{1,2})[./-]([0-9]{2}|[0-9]{4})")
_INTEGER = re.compile(r"[+-]?[0-9]+")
MIN_GRADE, MAX_GRADE = 1, 4

# row-level reject reasons raised by the schemas
MISSING_VALUE = "missing_value"
BAD_DATE = "bad_date"
AMBIGUOUS_DATE = "ambiguous_date"
BAD_RESULT = "bad_result"
BAD_GRADE = "bad_grade"
GRADE_OUT_OF_RANGE = "grade_out_of_range"


def _required(value: object) -> str:
    text = "" if value is None else str(value)
    if not text:
        raise PydanticCustomError(MISSING_VALUE, "empty value")
    return text


def _reader_id(value: object) -> str:
    return _required(value).upper()


def _iso_date(value: object) -> dt.date:
    if isinstance(value, dt.date):
        return value
    text = _required(value)
    if _ISO_DATE.fullmatch(text):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            raise PydanticCustomError(BAD_DATE, "not a calendar date") from None
    found = _DAY_MONTH.fullmatch(text)
    if found and int(found[1]) <= 12 and int(found[2]) <= 12 and found[1] != found[2]:
        raise PydanticCustomError(
            AMBIGUOUS_DATE, "day and month order cannot be told apart; write YYYY-MM-DD"
        )
    raise PydanticCustomError(BAD_DATE, "expected YYYY-MM-DD")


def _result(value: object) -> str:
    text = _required(value).lower()
    if text not in ("positive", "negative"):
        raise PydanticCustomError(BAD_RESULT, "expected positive or negative")
    return text


def _grade(value: object) -> int:
    if isinstance(value, int):
        grade = value
    else:
        text = _required(value)
        if not _INTEGER.fullmatch(text):
            raise PydanticCustomError(BAD_GRADE, "expected an integer category 1-4")
        grade = int(text)
    if not MIN_GRADE <= grade <= MAX_GRADE:
        raise PydanticCustomError(GRADE_OUT_OF_RANGE, "category outside 1-4")
    return grade


RequiredStr = Annotated[str, BeforeValidator(_required)]
IsoDate = Annotated[dt.date, BeforeValidator(_iso_date)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PcrRow(_Row):
    """One row of ``pcr.csv``: a dated PCR result of a pseudonymized patient at a site.

    Example row: ``P0001,H01,2020-03-14,positive``.
    """

    patient_id: RequiredStr
    site: RequiredStr
    test_date: IsoDate
    result: Annotated[Literal["positive", "negative"], BeforeValidator(_result)]


class GradeRow(_Row):
    """One row of ``grades.csv``: a reader's RSNA category for a study.

    Categories: 1 typical, 2 indeterminate, 3 atypical, 4 negative for pneumonia.
    Example row: ``1.2.826.0.1.3680043.8.498.1,R1,2,2020-04-02``.
    """

    study_instance_uid: RequiredStr
    reader_id: Annotated[str, BeforeValidator(_reader_id)]  # upper-cased
    category: Annotated[int, BeforeValidator(_grade)]
    read_date: IsoDate


R = TypeVar("R", bound=_Row)


@dataclass(frozen=True, order=True)
class Reject:
    """A row left out of the join: where it is and why."""

    file: str
    line: int
    reason: str
    detail: str


@dataclass
class CsvFile(Generic[R]):
    """The validated rows of one CSV file and the rows rejected from it.

    ``name`` is the file name written to the rejects table; ``where`` is the path used in
    error messages. ``n_rows`` counts data rows (blank lines excluded), so
    ``n_rows == len(rows) + len(rejects)`` until later checks move rows to ``rejects``.
    """

    name: str
    where: str
    rows: list[tuple[int, R]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    n_rows: int = 0
    n_blank: int = 0


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text of ``data`` without its byte-order mark; InputError naming file:line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        msg = f"{where}:{line}: not UTF-8 text (byte {exc.start})"
        raise InputError(msg) from exc


def detect_separator(header: str) -> str:
    """``;`` when the header line holds more semicolons than commas, else ``,``."""
    return ";" if header.count(";") > header.count(",") else ","


def _columns(model: type[_Row]) -> list[str]:
    return list(model.model_fields)


def _reason(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in err["loc"])
    kind = err["type"]
    if kind == "missing":
        kind = MISSING_VALUE
    return kind, f"{loc}: {err['msg']}"


def parse_csv(text: str, model: type[R], name: str, where: str) -> CsvFile[R]:
    """Validate the CSV ``text`` row by row against ``model``.

    Raises :class:`InputError` (``where:line``) when the file is malformed as a whole;
    row-level problems become :class:`Reject` rows.
    """
    nul = text.find("\0")
    if nul >= 0:
        nul_line = text.count("\n", 0, nul) + 1
        msg = f"{where}:{nul_line}: NUL byte (binary data, not CSV text)"
        raise InputError(msg)
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        msg = f"{where}:1: empty file or blank header line (expected: {', '.join(_columns(model))})"
        raise InputError(msg)
    sep = detect_separator(lines[0])
    reader = csv.reader(lines, delimiter=sep, strict=True)
    parsed = CsvFile[R](name=name, where=where)
    try:
        header = [h.strip().lower() for h in next(reader)]
        repeated = [i + 1 for i, h in enumerate(header) if header.count(h) > 1]
        if repeated:
            # header cells may be data (a file without a header): positions, not names
            msg = f"{where}:1: column(s) named twice (fields {', '.join(map(str, repeated))})"
            raise InputError(msg)
        missing = [c for c in _columns(model) if c not in header]
        if missing:
            msg = (
                f"{where}:1: missing column(s) {', '.join(missing)} "
                f"(separator '{sep}', {len(header)} fields in the header line)"
            )
            raise InputError(msg)
        index = {c: header.index(c) for c in _columns(model)}
        first_seen: dict[tuple[str, ...], int] = {}
        end = reader.line_num
        for raw in reader:
            line, end = end + 1, reader.line_num
            fields = tuple(f.strip() for f in raw)
            if not any(fields):
                parsed.n_blank += 1
                continue
            parsed.n_rows += 1
            if len(fields) != len(header):
                detail = f"expected {len(header)} fields, got {len(fields)}"
                parsed.rejects.append(Reject(name, line, "wrong_field_count", detail))
                continue
            if fields in first_seen:
                detail = f"same as line {first_seen[fields]}"
                parsed.rejects.append(Reject(name, line, "duplicate_row", detail))
                continue
            first_seen[fields] = line
            try:
                row = model.model_validate({c: fields[i] for c, i in index.items()})
            except ValidationError as exc:
                reason, detail = _reason(exc)
                parsed.rejects.append(Reject(name, line, reason, detail))
                continue
            parsed.rows.append((line, row))
    except csv.Error as exc:
        msg = f"{where}:{reader.line_num}: unreadable CSV ({exc})"
        raise InputError(msg) from exc
    return parsed


def first_lines(rejects: Sequence[Reject], where: str, limit: int = 5) -> str:
    """``where:line reason`` of the first ``limit`` rejects, for error messages."""
    shown = sorted(rejects)[:limit]
    more = len(rejects) - len(shown)
    text = ", ".join(f"{where}:{r.line} {r.reason}" for r in shown)
    return text + (f" (+{more} more)" if more > 0 else "")
