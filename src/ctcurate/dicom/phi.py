"""The PHI policy of ``index``: which identifying elements may hold what.

The archive is supposed to be de-identified at the hospitals (DICOM PS3.15 Annex E); index
verifies it. Each identifying element has an action:

- ``empty``: must be empty (PS3.15 ``X``: removed);
- ``pseudonym``: empty, equal to the file's PatientID (a pseudonym), a full match of a
  declared pseudonym pattern, a code (every word of the value holds a digit or is a
  declared dummy: ``1177879318455840``, ``Anonymized1``, ``ANON^0001``; no person's or
  institution's name is written with digits in every word), or a dummy value (a declared
  one such as ``ANONYMOUS``, or a value without any letter or digit such as ``----``)
  (PS3.15 ``Z``/``D``);
- ``year``: a date that is empty or reduced to its year (``YYYY0101``);
- ``retain``: kept (e.g. InstitutionName under the Retain Institution Identity option);
  counted, never checked.

``strict`` turns every action into ``empty``. Each non-empty element is judged to a rule:
``pseudonym``, ``dummy``, ``year``, ``retain`` (accepted) or ``phi`` (the file is
quarantined ``phi_present`` naming the tag). Values are never returned: only keywords and
rule names leave this module.

Pure: no I/O, no pydicom (the readers hand in the element values as text).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal, get_args

Action = Literal["empty", "pseudonym", "year", "retain"]
Rule = Literal["empty", "pseudonym", "dummy", "year", "retain", "phi"]
#: Identifying elements index judges (keywords), PS3.15 Annex E.
Element = Literal[
    "PatientName",
    "PatientBirthDate",
    "PatientBirthName",
    "PatientMotherBirthName",
    "OtherPatientNames",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientComments",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "OperatorsName",
]
ELEMENTS: tuple[str, ...] = get_args(Element)
#: Default action of each element (PS3.15 Basic Profile practice; see docs/index.md).
DEFAULT_ACTIONS: dict[str, Action] = {
    "PatientName": "pseudonym",
    "PatientBirthDate": "empty",
    "PatientBirthName": "empty",
    "PatientMotherBirthName": "empty",
    "OtherPatientNames": "empty",
    "OtherPatientIDs": "empty",
    "OtherPatientIDsSequence": "empty",
    "PatientAddress": "empty",
    "PatientTelephoneNumbers": "empty",
    "PatientComments": "empty",
    # PS3.15 Z: gateways write an empty, dummy or hashed value that cannot be told from an
    # original; counted in the census, required empty by strict mode or an override
    "AccessionNumber": "retain",
    # PS3.15 X/Z/D: de-identifiers remove it or write a dummy or a hash in its place
    "InstitutionName": "pseudonym",
    "InstitutionAddress": "empty",
    "ReferringPhysicianName": "pseudonym",
    "ReferringPhysicianAddress": "empty",
    "ReferringPhysicianTelephoneNumbers": "empty",
    "PerformingPhysicianName": "pseudonym",
    "PhysiciansOfRecord": "pseudonym",
    "NameOfPhysiciansReadingStudy": "pseudonym",
    "RequestingPhysician": "pseudonym",
    "OperatorsName": "pseudonym",
}
DATE_ELEMENTS = frozenset({"PatientBirthDate"})
SEQUENCE_ELEMENTS = frozenset({"OtherPatientIDsSequence"})
#: Dummy values of de-identification tools (compared case-insensitively).
DEFAULT_DUMMIES: tuple[str, ...] = (
    "ANON",
    "ANONYMISED",
    "ANONYMIZED",
    "ANONYMOUS",
    "DEIDENTIFIED",
    "DE-IDENTIFIED",
    "PSEUDONYMISED",
    "PSEUDONYMIZED",
    "REMOVED",
    "UNKNOWN",
    # words of a code, never a name alone: "Patient 12", "SUBJECT^007", "Case-3"
    "PATIENT",
    "SUBJECT",
    "CASE",
)
_EMPTY = " \x00^=\\"  # a value made of separators only is empty
_YEAR_ONLY = re.compile(r"[0-9]{4}0101")
#: A word of a value: a run of letters and digits (any script).
_WORD = re.compile(r"[^\W_]+")
_DIGIT = re.compile(r"[0-9]")


def allowed_actions(element: str) -> frozenset[str]:
    """The actions that make sense for ``element``."""
    if element in SEQUENCE_ELEMENTS:
        return frozenset({"empty", "retain"})
    if element in DATE_ELEMENTS:
        return frozenset({"empty", "year", "retain"})
    return frozenset({"empty", "pseudonym", "retain"})


@dataclass(frozen=True, eq=False)
class Rules:
    """The effective policy of one site (hashed by identity: a cache key)."""

    actions: Mapping[str, Action]
    patterns: tuple[str, ...] = ()
    dummies: frozenset[str] = frozenset(DEFAULT_DUMMIES)

    @functools.cached_property
    def _compiled(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(p) for p in self.patterns)

    def judge(self, element: str, values: Iterable[str] | None, patient_id: str | None) -> Rule:
        """The rule ``values`` of ``element`` fall under (``None``: a non-empty sequence)."""
        action = self.actions.get(element, "empty")
        if values is None:
            return "retain" if action == "retain" else "phi"
        texts = [v.strip(_EMPTY) for v in values]
        texts = [t for t in texts if t]
        if not texts:
            return "empty"
        if action == "retain":
            return "retain"
        if action == "year":
            return "year" if all(_YEAR_ONLY.fullmatch(t) for t in texts) else "phi"
        if action != "pseudonym":
            return "phi"
        found = {self._pseudonym_rule(t, patient_id) for t in texts}
        if "phi" in found:
            return "phi"
        return "pseudonym" if "pseudonym" in found else "dummy"

    def _pseudonym_rule(self, text: str, patient_id: str | None) -> Rule:
        if patient_id and text == patient_id:
            return "pseudonym"
        if any(p.fullmatch(text) for p in self._compiled):
            return "pseudonym"
        words = _WORD.findall(text)
        if text.upper() in self.dummies or not words:  # not words: no letter or digit
            return "dummy"
        if any(_DIGIT.search(w) for w in words) and all(
            _DIGIT.search(w) or w.upper() in self.dummies for w in words
        ):
            return "pseudonym"  # a code: a hash, a counter, a study number
        return "phi"


def make_rules(
    *,
    strict: bool,
    actions: Mapping[str, Action],
    patterns: Iterable[str],
    dummies: Iterable[str],
) -> Rules:
    """Rules from the defaults, ``actions`` over them; strict: every action ``empty``."""
    merged: dict[str, Action] = dict(DEFAULT_ACTIONS) | dict(actions)
    if strict:
        merged = dict.fromkeys(merged, "empty")
    return Rules(merged, tuple(patterns), frozenset(d.upper() for d in dummies))


@dataclass(frozen=True, eq=False)
class Policy:
    """The rules of every site: a default and per-site overrides."""

    default: Rules = field(
        default_factory=lambda: make_rules(
            strict=False, actions={}, patterns=(), dummies=DEFAULT_DUMMIES
        )
    )
    sites: Mapping[str, Rules] = field(default_factory=dict)
    #: Text that identifies the policy (part of the index's reader fingerprint).
    fingerprint: str = "default"
    #: The site of a file's archive path (``index.site_from``); ``None``: its first folder.
    #: Per-site rules and the rows' ``site`` both follow it.
    site_rule: Callable[[str], str | None] | None = None

    def site_of(self, path: str) -> str | None:
        """The site of the file at the archive path ``path`` (``None``: no site)."""
        if self.site_rule is not None:
            return self.site_rule(path)
        parts = PurePosixPath(path).parts
        return parts[0] if len(parts) > 1 else None

    def rules_for(self, site: str | None) -> Rules:
        """The rules of ``site`` (the default for a file at the archive root)."""
        if site is None:
            return self.default
        return self.sites.get(site, self.default)


DEFAULT_POLICY = Policy()


def accepted_label(path: str, rule: str) -> str:
    """The census label of an accepted element: ``Keyword:rule`` (path for nested ones)."""
    return f"{path}:{rule}"
