"""The body region of a series, from the words its headers carry.

A declared vocabulary (``stages/select/body_region.yaml``, edited by a reviewer) lists the
headers to read, in order, and the terms that name the chest and other regions. A series
is:

- ``chest`` when one of its headers names the chest (the first such header decides);
- another region (``head``, ``abdomen``, ...) when no header names the chest and one
  names that region (the first such header decides; within a header, the first region of
  the vocabulary);
- ``unknown`` when no header names any region.

Matching is case-insensitive and accent-insensitive (``Tórax`` = ``torax``) and
word-aware: a term matches where no letter touches it on either side, so ``chest`` does
not match ``CHESTER`` nor ``rib`` ``ribbon``; digits and punctuation separate words
(``CT_CHEST``, ``2 Chest C-/Thorax``), and so do CamelCase humps (``ChestRoutine``,
``AThoraxRoutine``; never within one case: ``CHESTER``). A term ending in ``*`` matches
words starting with it (``thora*``: thorax, thoracic). A term holding a CJK, kana or
Hangul character matches anywhere (those scripts write words without spaces: ``胸部``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ctcurate.errors import InputError

#: The vocabulary file in the select rules folder.
VOCABULARY_FILE = "body_region.yaml"
CHEST = "chest"
UNKNOWN = "unknown"
#: Headers a vocabulary may name, and their column in the index ``series`` table.
HEADER_COLUMNS: dict[str, str] = {
    "BodyPartExamined": "body_part_examined",
    "AnatomicRegionSequence": "anatomic_region",  # the items' CodeMeaning
    "StudyDescription": "study_description",
    "ProtocolName": "protocol_name",
    "SeriesDescription": "series_description",
    "RequestedProcedureDescription": "requested_procedure_description",
}
_LETTER = r"[^\W\d_]"  # a letter of any script
#: Where a CamelCase header word splits (Siemens protocols: ChestRoutine, AThoraxRoutine).
_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_UNSPACED_FROM = 0x2E80  # CJK radicals, kana, CJK ideographs, Hangul and beyond

Term = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
RegionName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]


class Vocabulary(BaseModel):
    """The content of ``body_region.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    headers: Annotated[tuple[str, ...], Field(min_length=1)]
    chest: Annotated[tuple[Term, ...], Field(min_length=1)]
    other: dict[RegionName, Annotated[tuple[Term, ...], Field(min_length=1)]]


def normalise(text: str) -> str:
    """``text`` case-folded, without accents, compatibility forms folded (NFKD)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _term_pattern(term: str) -> str:
    prefix = term.endswith("*")
    word = normalise(term.rstrip("*").strip())
    body = r"\s+".join(re.escape(part) for part in word.split())
    if any(ord(c) >= _UNSPACED_FROM for c in word):
        return body
    return f"(?<!{_LETTER}){body}" + ("" if prefix else f"(?!{_LETTER})")


def _compile(terms: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{_term_pattern(t)})" for t in terms))


@dataclass(frozen=True)
class BodyRegions:
    """A compiled vocabulary: :meth:`classify` gives ``(region, deciding header)``."""

    headers: tuple[str, ...]
    patterns: tuple[tuple[str, re.Pattern[str]], ...]  # chest first, then the others

    @property
    def columns(self) -> tuple[str, ...]:
        """The ``series`` columns of :attr:`headers`, in order."""
        return tuple(HEADER_COLUMNS[h] for h in self.headers)

    def regions_named(self, text: str | None) -> list[str]:
        """The regions ``text`` names, in vocabulary order (chest first)."""
        if not text:
            return []
        norm = normalise(_CAMEL_RE.sub(" ", text))
        return [name for name, pattern in self.patterns if pattern.search(norm)]

    def classify(self, values: Sequence[str | None]) -> tuple[str, str | None]:
        """``(region, header)`` of a series from its header values (in :attr:`headers` order).

        ``header`` is the keyword of the header that decided, ``None`` for ``unknown``.
        """
        return self._classify(tuple(values))

    @lru_cache(maxsize=4096)  # noqa: B019 - a few vocabularies live for the whole run
    def _classify(self, values: tuple[str | None, ...]) -> tuple[str, str | None]:
        found = [self.regions_named(v) for v in values]
        for header, names in zip(self.headers, found, strict=True):
            if CHEST in names:
                return CHEST, header
        for header, names in zip(self.headers, found, strict=True):
            if names:
                return names[0], header
        return UNKNOWN, None


def compile_vocabulary(vocabulary: Vocabulary, where: str = "vocabulary") -> BodyRegions:
    """:class:`BodyRegions` of a validated vocabulary; :class:`InputError` naming ``where``."""
    unknown = [h for h in vocabulary.headers if h not in HEADER_COLUMNS]
    if unknown:
        msg = (
            f"{where}: unknown header(s) {', '.join(unknown)} (known: {', '.join(HEADER_COLUMNS)})"
        )
        raise InputError(msg)
    if len(set(vocabulary.headers)) != len(vocabulary.headers):
        msg = f"{where}: a header is listed twice"
        raise InputError(msg)
    if CHEST in vocabulary.other or UNKNOWN in vocabulary.other:
        msg = f"{where}: other: '{CHEST}' and '{UNKNOWN}' are not other regions"
        raise InputError(msg)
    patterns = [(CHEST, _compile(vocabulary.chest))]
    patterns += [(name, _compile(terms)) for name, terms in vocabulary.other.items()]
    return BodyRegions(vocabulary.headers, tuple(patterns))


def read_vocabulary(path: Path) -> BodyRegions:
    """The compiled vocabulary of ``path``; :class:`InputError` naming the file when bad."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"{path}: body region vocabulary not found"
        raise InputError(msg) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        msg = f"{path}: unreadable body region vocabulary ({exc.__class__.__name__})"
        raise InputError(msg) from None
    if not isinstance(data, Mapping):
        msg = f"{path}: body region vocabulary must be a mapping"
        raise InputError(msg)
    try:
        vocabulary = Vocabulary.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = f"{path}: {key}: {first['msg']}"
        raise InputError(msg) from None
    return compile_vocabulary(vocabulary, str(path))
