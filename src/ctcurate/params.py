"""Typed params: one pydantic model per ``params.yaml`` section.

Every model forbids unknown keys, so a typo'd key fails the stage with a one-line message
naming it instead of being silently ignored. Ranges are checked here, once.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctcurate.errors import ParamsError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    """Base of every params section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthParams(Section):
    """``synth``: the built-in synthetic hospital archive."""

    patients: PositiveInt = 40
    seed: Annotated[int, Field(ge=0)] = 20200101
    matrix: Annotated[int, Field(ge=32, le=512)] = 96
    pandemic_start: dt.date = dt.date(2020, 1, 1)

    @model_validator(mode="after")
    def _check_pandemic_start(self) -> SynthParams:
        # studies span 2018-01-01..2021-12-31; both eras must hold at least one day
        if not dt.date(2018, 1, 2) <= self.pandemic_start <= dt.date(2021, 12, 31):
            msg = f"pandemic_start ({self.pandemic_start}) must be within 2018-01-02..2021-12-31"
            raise ValueError(msg)
        return self


class SnapshotParams(Section):
    """``snapshot``: listing of the archive root."""

    ignore: tuple[str, ...] = ()


class IndexParams(Section):
    """``index``: the header scan."""

    workers: PositiveInt = 2
    shard_size: PositiveInt = 50_000
    max_file_mb: PositiveFloat = 2048.0
    timeout_s: PositiveFloat = 60.0
    chunk_files: PositiveInt = 512
    duckdb_memory_mb: PositiveInt = 128  # the build's DuckDB spills to disk beyond this


class SelectParams(Section):
    """``select``: rules over the catalog and the era split."""

    pandemic_start: dt.date = dt.date(2020, 1, 1)
    min_slices: PositiveInt = 16
    max_slice_thickness_mm: PositiveFloat = 3.0
    min_z_coverage_mm: PositiveFloat = 120.0
    workers: PositiveInt = 2  # local processes reading the survivors' pixels
    working_spacing_mm: PositiveFloat = 2.0  # the scorer's isotropic working grid
    threshold: Fraction = 0.5  # pneumonia score >= threshold → pneumonia
    l2: PositiveFloat = 0.1  # L2 penalty of the pneumonia logistic regression
    audit_seed: Annotated[int, Field(ge=0)] = 7  # demo audit list sample / audit sample
    audit_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75  # of the truth's chest CTs
    audit_sample_k: Annotated[int, Field(ge=0)] = 5  # selected + rejected series for review


class AnnotateJoinParams(Section):
    """``annotate_join``: PCR window rule and reader consensus."""

    pcr_days_before: Annotated[int, Field(ge=0)] = 14
    pcr_days_after: Annotated[int, Field(ge=0)] = 7
    pcr_min_negatives: PositiveInt = 1
    consensus: Literal["majority"] = "majority"
    tie_break: Literal["most_typical", "least_typical", "unresolved"] = "most_typical"
    max_reject_fraction: Fraction = 0.05
    min_coverage: Fraction = 0.5
    readers: tuple[str, ...] = ()  # known reader ids; empty accepts every reader


class PackParams(Section):
    """``pack``: volumes, splits and shards of a release."""

    spacing_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (4.0, 4.0, 4.0)
    shape: tuple[PositiveInt, PositiveInt, PositiveInt] = (48, 64, 64)
    hu_min: int = -1024
    hu_max: int = 3071
    split_seed: Annotated[int, Field(ge=0)] = 1
    split_fractions: tuple[Fraction, Fraction, Fraction] = (0.6, 0.2, 0.2)
    shard_max_cases: PositiveInt = 64
    # each case carries a keyed pseudonym of (site, patient id); the key comes from the
    # environment (ctcurate.pack.PSEUDONYM_KEY_ENV) and pack fails without it
    patient_pseudonyms: bool = False
    # local processes building the volumes (not part of the release: left out of its manifest)
    workers: PositiveInt = 2

    @model_validator(mode="after")
    def _check(self) -> PackParams:
        if self.hu_min >= self.hu_max:
            msg = f"hu_min ({self.hu_min}) must be below hu_max ({self.hu_max})"
            raise ValueError(msg)
        total = sum(self.split_fractions)
        if abs(total - 1.0) > 1e-6:
            msg = f"split_fractions must sum to 1 (got {total:g})"
            raise ValueError(msg)
        return self


class TrainParams(Section):
    """``train``: segmentation and typicality models.

    The defaults are the CPU demo profile (about 2.5 minutes on 2 CPU cores for the demo
    release of 48x64x64 volumes); docs/models.md documents the larger profile and both
    measurements.
    """

    seed: Annotated[int, Field(ge=0)] = 0
    epochs: PositiveInt = 45
    batch_size: PositiveInt = 4
    lr: PositiveFloat = 3e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    channels: tuple[PositiveInt, ...] = Field(default=(8, 16, 32, 64), min_length=2)
    num_res_units: Annotated[int, Field(ge=0, le=4)] = 0
    loss: Literal["dice_ce", "dice_focal"] = "dice_ce"
    # Dice of the loss over the whole batch, or per case then averaged (as evaluate scores)
    dice_over: Literal["batch", "case"] = "batch"
    # loss weights of background, normal lung, GGO, consolidation (cross-entropy / focal)
    class_weights: tuple[PositiveFloat, PositiveFloat, PositiveFloat, PositiveFloat] = (
        1.0,
        1.0,
        3.0,
        3.0,
    )
    patch: tuple[PositiveInt, PositiveInt, PositiveInt] | None = (32, 64, 64)  # None: whole
    lesion_crop_fraction: Fraction = 0.5  # patches centred on a lesion voxel
    flip: bool = True  # random left-right flips
    val_every: PositiveInt = 3  # epochs between validations (the last one always)
    amp: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt = 2
    classifier_features: Literal["predicted", "truth"] = "predicted"
    classifier_splits: tuple[Literal["train", "val"], ...] = Field(
        default=("train", "val"), min_length=1
    )
    classifier_balanced: bool = False  # weight the two classes equally in the fit
    classifier_l2: PositiveFloat = 1.0
    # lesion components smaller than this (mm^3) become normal lung; with several values
    # the one with the best mean val lesion Dice is kept (the smallest on a tie)
    min_lesion_mm3: tuple[Annotated[float, Field(ge=0.0)], ...] = Field(
        default=(0.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0), min_length=1
    )


class EvaluateParams(Section):
    """``evaluate``: metrics on the release's test split."""

    threshold: Fraction = 0.5
    hu_lung_max: int = -400
    max_overlays: Annotated[int, Field(ge=0)] = 16
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt = 2


class Params(Section):
    """The whole of ``params.yaml``."""

    synth: SynthParams = SynthParams()
    snapshot: SnapshotParams = SnapshotParams()
    index: IndexParams = IndexParams()
    select: SelectParams = SelectParams()
    annotate_join: AnnotateJoinParams = AnnotateJoinParams()
    pack: PackParams = PackParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()


S = TypeVar("S", bound=Section)


def _format_error(where: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    key = f"{where}.{loc}" if loc else where
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    return f"bad value for '{key}': {err['msg']}"


def load_yaml(path: Path) -> dict[str, object]:
    """Read ``params.yaml`` as a mapping, failing clearly if it is unusable."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: params file not found"
        raise ParamsError(msg)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        msg = f"{path}{line}: not valid YAML"
        raise ParamsError(msg) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        msg = f"{path}: top level must be a mapping of sections"
        raise ParamsError(msg)
    return data


def load_params(path: Path) -> Params:
    """Load and validate the whole params file."""
    data = load_yaml(path)
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        msg = f"{path}: {_format_error('params', exc).replace('params.', '', 1)}"
        raise ParamsError(msg) from exc


def load_section(path: Path, name: str, model: type[S]) -> S:
    """Load and validate one section of ``params.yaml`` with ``model``."""
    data = load_yaml(path)
    raw = data.get(name, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        msg = f"{path}: section '{name}' must be a mapping"
        raise ParamsError(msg)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        msg = f"{path}: {_format_error(name, exc)}"
        raise ParamsError(msg) from exc
