"""The cohort plan: patients, studies, eras, patterns and which series carry which trap.

Pure: params and a seeded generator in, a list of :class:`Study` out. Every UID is derived
from the seed, so the same params always give the same archive.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import generate_uid

from ctcurate.demo.anatomy import Body, sample_body
from ctcurate.demo.vendors import SITE_BY_CODE, SITES
from ctcurate.params import SynthParams

FIRST_DATE = dt.date(2018, 1, 1)
LAST_DATE = dt.date(2021, 12, 31)
THICK_MM = 5.0

# (era, pneumonia, covid) case mix, cycled then shuffled so small archives get every kind.
_MIX = (
    ("pandemic", True, True),
    ("pre_pandemic", True, False),
    ("pre_pandemic", False, False),
    ("pandemic", True, True),
    ("pre_pandemic", True, False),
    ("pandemic", False, False),
    ("pandemic", True, False),
    ("pandemic", True, True),
    ("pre_pandemic", True, False),
    ("pandemic", False, False),
)
_COVID_PATTERNS = (("typical", "indeterminate", "atypical"), (0.64, 0.28, 0.08))
_OTHER_PATTERNS = (("atypical", "indeterminate", "typical"), (0.6, 0.25, 0.15))
EXTRA_KINDS = ("head", "abdomen", "mr", "cr")

# Traps carried by chest studies: name → needs a thick recon.
CHEST_TRAPS: dict[str, bool] = {
    "duplicate_site": False,
    "shuffled_names": False,
    "missing_slice": False,
    "duplicate_slice": False,
    "rle_lossless": False,
    "jpeg2000_lossless": False,
    "jpegls_lossless": True,
    "truncated": True,
    "phi_birth_date": False,
}


@dataclass(frozen=True)
class Study:
    """One planned study of one patient."""

    index: int
    patient_index: int
    patient_id: str
    site: str
    kind: str  # chest | head | abdomen | mr | cr
    study_uid: str
    study_date: dt.date
    era: str
    pattern: str | None
    pneumonia: bool
    covid: bool
    severity: float
    border: bool
    thickness: float
    fov: float
    thick: bool
    seed: int
    body: Body
    traps: tuple[str, ...] = field(default=())


def uid(seed: int, *parts: object) -> str:
    """A deterministic DICOM UID from the seed and a path of names."""
    return str(generate_uid(entropy_srcs=["ctcurate-synth", str(seed), *map(str, parts)]))


def patient_pseudonym(seed: int, index: int) -> str:
    """A pseudonymous PatientID (hex digest; carries no identity)."""
    digest = hashlib.sha256(f"ctcurate-synth:{seed}:{index}".encode()).hexdigest()
    return f"PSN{digest[:10].upper()}"


def era_of(date: dt.date, pandemic_start: dt.date) -> str:
    """``pandemic`` on or after the start date, ``pre_pandemic`` before."""
    return "pandemic" if date >= pandemic_start else "pre_pandemic"


def _random_date(rng: np.random.Generator, first: dt.date, last: dt.date) -> dt.date:
    return first + dt.timedelta(days=int(rng.integers(0, (last - first).days + 1)))


def _era_range(era: str, pandemic_start: dt.date) -> tuple[dt.date, dt.date]:
    if era == "pandemic":
        return pandemic_start, LAST_DATE
    return FIRST_DATE, pandemic_start - dt.timedelta(days=1)


def _thin_thickness(rng: np.random.Generator, site: str) -> float:
    """A thin lung recon thickness from the site's protocol."""
    spec = SITE_BY_CODE[site]
    return float(spec.thin_mm[int(rng.choice(len(spec.thin_mm), p=spec.thin_p))])


def plan_cohort(params: SynthParams, rng: np.random.Generator) -> list[Study]:
    """Plan every study of the archive, traps included, sorted by study index."""
    n = params.patients
    mix = [_MIX[i % len(_MIX)] for i in range(n)]
    mix = [mix[i] for i in rng.permutation(n)]
    site_order = [SITES[i % len(SITES)].code for i in range(n)]
    site_order = [site_order[i] for i in rng.permutation(n)]
    studies: list[Study] = []
    for p, (era, pneumonia, covid) in enumerate(mix):
        if pneumonia:
            names, probs = _COVID_PATTERNS if covid else _OTHER_PATTERNS
            pattern = str(rng.choice(names, p=probs))
            severity = float(np.clip(rng.beta(1.6, 1.8), 0.03, 0.97))
        else:
            pattern, severity = "negative", 0.0
        body = sample_body(rng)
        first, last = _era_range(era, params.pandemic_start)
        studies.append(
            Study(
                index=p,
                patient_index=p,
                patient_id=patient_pseudonym(params.seed, p),
                site=site_order[p],
                kind="chest",
                study_uid=uid(params.seed, "study", p),
                study_date=_random_date(rng, first, last),
                era=era,
                pattern=pattern,
                pneumonia=pneumonia,
                covid=covid,
                severity=round(severity, 3),
                border=bool(pneumonia and severity > 0.45 and rng.random() < 0.5),
                thickness=_thin_thickness(rng, site_order[p]),
                fov=float(np.clip(2.2 * body.half_width + rng.uniform(0, 40), 300, 400)),
                thick=bool(p == 0 or rng.random() < 0.75),
                seed=int(rng.integers(0, 2**31 - 1)),
                body=body,
            )
        )
    n_extra = max(1, round(n * 0.06))
    for kind in EXTRA_KINDS:
        for _ in range(n_extra):
            owner = studies[int(rng.integers(n))]
            date = _random_date(rng, FIRST_DATE, LAST_DATE)
            index = len(studies)
            studies.append(
                Study(
                    index=index,
                    patient_index=owner.patient_index,
                    patient_id=owner.patient_id,
                    site=owner.site,
                    kind=kind,
                    study_uid=uid(params.seed, "study", index),
                    study_date=date,
                    era=era_of(date, params.pandemic_start),
                    pattern=None,
                    pneumonia=False,
                    covid=False,
                    severity=0.0,
                    border=False,
                    thickness=5.0,
                    fov=float(rng.uniform(220, 260) if kind in ("head", "mr") else 360.0),
                    thick=False,
                    seed=int(rng.integers(0, 2**31 - 1)),
                    body=sample_body(rng),
                )
            )
    return _assign_traps(studies, rng)


def _assign_traps(studies: list[Study], rng: np.random.Generator) -> list[Study]:
    """Spread the chest traps over the chest studies (cycling when there are few)."""
    chest = [s.index for s in studies if s.kind == "chest"]
    with_thick = [s.index for s in studies if s.kind == "chest" and s.thick]
    order = [chest[i] for i in rng.permutation(len(chest))]
    order_thick = [with_thick[i] for i in rng.permutation(len(with_thick))]
    traps: dict[int, list[str]] = {}
    k = k_thick = 0
    for name, needs_thick in CHEST_TRAPS.items():
        if needs_thick:
            target = order_thick[k_thick % len(order_thick)]
            k_thick += 1
        else:
            target = order[k % len(order)]
            k += 1
        traps.setdefault(target, []).append(name)
    out: list[Study] = []
    for s in studies:
        extra: list[str] = list(traps.get(s.index, []))
        if s.kind == "head" and not any("phi_institution" in t.traps for t in out):
            extra.append("phi_institution")
        if s.kind == "cr" and not any("phi_patient_name" in t.traps for t in out):
            extra.append("phi_patient_name")
        out.append(_with_traps(s, tuple(sorted(extra))))
    return out


def _with_traps(study: Study, traps: tuple[str, ...]) -> Study:
    from dataclasses import replace

    return replace(study, traps=traps)
