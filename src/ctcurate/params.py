"""Typed params: one pydantic model per ``params.yaml`` section.

Every model forbids unknown keys, so a typo'd key fails the stage with a one-line message
naming it instead of being silently ignored; so does an unknown top-level section (``indx:``
for ``index:``), whichever section is loaded. Ranges are checked here, once: no float may be
infinite or NaN, HU values fit the int16 volumes they are written into, shapes and spacings
stay within stated bounds (below), and DuckDB gets at least the memory the index build needs.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ctcurate.dicom import phi
from ctcurate.errors import ParamsError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
#: HU values written into (or compared with) the int16 volumes of a release: outside this
#: range a value would wrap around (-40000 HU written as int16 reads +25536).
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
Hu = Annotated[int, Field(ge=INT16_MIN, le=INT16_MAX)]
#: Bounds of a release grid. A side of more than MAX_SIDE voxels, or a volume of more than
#: MAX_VOXELS (512^3), cannot be packed on an ordinary machine: resampling one case holds
#: about 20 bytes per voxel (float64 image and labels, int16 and uint8 copies), 2.7 GB per
#: worker at the bound. Spacings below 0.1 mm or above 50 mm are no CT grid.
MAX_SIDE = 1024
MAX_VOXELS = 512**3
Side = Annotated[int, Field(gt=0, le=MAX_SIDE)]
SpacingMm = Annotated[float, Field(ge=0.1, le=50.0)]
#: DuckDB memory of the index build: below 64 MB DuckDB runs out of memory on archives of a
#: few ten thousand instances (16 MB failed at 20k instances, 32 MB at 60k; 14 MB even on 25
#: files), so smaller values are refused (docs/index.md).
MIN_DUCKDB_MEMORY_MB = 64


class Section(BaseModel):
    """Base of every params section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    #: Execution knobs: how the stage runs, not what it writes. They stay out of the
    #: stage's DVC params (changing one reruns nothing) and out of release manifests.
    EXECUTION: ClassVar[frozenset[str]] = frozenset()


class SynthParams(Section):
    """``synth``: the built-in synthetic hospital archive."""

    patients: PositiveInt = 40
    seed: Annotated[int, Field(ge=0)] = 20200101
    matrix: Annotated[int, Field(ge=32, le=512)] = 96
    pandemic_start: dt.date = dt.date(2020, 1, 1)
    #: Share of pneumonia studies given consolidation against the pleura anywhere around
    #: the lung (anterior, lateral, medial, posterior), with a ground-glass rim; 0 keeps the
    #: demo's lesion model (docs/synth.md).
    pleural_consolidation: Fraction = 0.0
    #: Share of chest studies (any pattern, clear lungs too) given dependent density along
    #: the back of the lower lungs, labelled normal lung; 0 keeps the demo's lungs.
    dependent_atelectasis: Fraction = 0.0
    #: Vessel trees per lung from each hilum (4: the demo's; more gives the vessel load of
    #: real chest CT, docs/synth.md).
    vessel_trees: Annotated[int, Field(ge=4, le=32)] = 4

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


class SiteRule(Section):
    """``index.site_from``: where a file's site comes from (one of the two keys).

    ``path_component``: the folder at this position of the file's path (0: the first
    folder under the archive root; -1: the folder holding the file, -2 its parent...).
    ``path_regex``: the named group ``site`` of the first match of a regular expression
    (Python syntax) in the file's path. A path without that folder or match has no site
    (flag ``no_site``).
    """

    path_component: int | None = None
    path_regex: str | None = None

    @model_validator(mode="after")
    def _check_one_rule(self) -> SiteRule:
        if (self.path_component is None) == (self.path_regex is None):
            msg = "give exactly one of path_component, path_regex"
            raise ValueError(msg)
        if self.path_regex is not None:
            try:
                groups = re.compile(self.path_regex).groupindex
            except re.error as exc:
                msg = f"path_regex does not compile ({exc.msg})"
                raise ValueError(msg) from None
            if "site" not in groups:
                msg = "path_regex needs a named group (?P<site>...)"
                raise ValueError(msg)
        return self


class SitePhiPolicy(Section):
    """``index.phi.sites.<site>``: a site's changes to the PHI policy (unset: inherited)."""

    strict: bool | None = None
    actions: dict[phi.Element, phi.Action] = Field(default_factory=dict)
    pseudonym_patterns: tuple[str, ...] | None = None
    dummy_values: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _check_policy(self) -> SitePhiPolicy:
        for element, action in self.actions.items():
            allowed = phi.allowed_actions(element)
            if action not in allowed:
                msg = f"{element}: action {action!r} not one of {', '.join(sorted(allowed))}"
                raise ValueError(msg)
        for pattern in self.pseudonym_patterns or ():
            try:
                re.compile(pattern)
            except re.error as exc:
                msg = f"pseudonym pattern {pattern!r} is not a regular expression ({exc})"
                raise ValueError(msg) from None
        return self


class PhiPolicy(SitePhiPolicy):
    """``index.phi``: the PHI policy identifying attributes are judged by (docs/index.md).

    ``actions`` change the defaults of :data:`ctcurate.dicom.phi.DEFAULT_ACTIONS`; ``strict``
    makes every identifying attribute ``empty``; ``sites`` change any of these per site.
    """

    strict: bool = False
    pseudonym_patterns: tuple[str, ...] = ()
    dummy_values: tuple[str, ...] = phi.DEFAULT_DUMMIES
    sites: dict[str, SitePhiPolicy] = Field(default_factory=dict)

    def compiled(self) -> phi.Policy:
        """The policy the readers apply (default rules and each site's)."""

        def rules(site: SitePhiPolicy | None) -> phi.Rules:
            s = site or SitePhiPolicy()
            return phi.make_rules(
                strict=self.strict if s.strict is None else s.strict,
                actions={str(k): v for k, v in (self.actions | s.actions).items()},
                patterns=self.pseudonym_patterns
                if s.pseudonym_patterns is None
                else s.pseudonym_patterns,
                dummies=self.dummy_values if s.dummy_values is None else s.dummy_values,
            )

        return phi.Policy(
            default=rules(None),
            sites={name: rules(site) for name, site in sorted(self.sites.items())},
            fingerprint=self.model_dump_json(),
        )


class IndexParams(Section):
    """``index``: the header scan."""

    EXECUTION: ClassVar[frozenset[str]] = frozenset({"workers", "chunk_files", "duckdb_memory_mb"})

    site_from: SiteRule = SiteRule(path_component=0)

    workers: PositiveInt = 2
    shard_size: PositiveInt = 50_000
    max_file_mb: PositiveFloat = 2048.0
    timeout_s: PositiveFloat = 60.0
    chunk_files: PositiveInt = 512
    # the build's DuckDB spills to disk beyond this; less than the minimum cannot work
    duckdb_memory_mb: Annotated[int, Field(ge=MIN_DUCKDB_MEMORY_MB)] = 128
    phi: PhiPolicy = Field(default_factory=PhiPolicy)


class SelectParams(Section):
    """``select``: rules over the catalog and the era split."""

    EXECUTION: ClassVar[frozenset[str]] = frozenset({"workers"})

    pandemic_start: dt.date = dt.date(2020, 1, 1)
    min_slices: PositiveInt = 16
    max_slice_thickness_mm: PositiveFloat = 3.0
    min_z_coverage_mm: PositiveFloat = 120.0
    workers: PositiveInt = 2  # local processes reading the survivors' pixels
    working_spacing_mm: PositiveFloat = 2.0  # the scorer's isotropic working grid
    threshold: Fraction = 0.5  # pneumonia score >= threshold → pneumonia
    l2: PositiveFloat = 0.1  # L2 penalty of the pneumonia logistic regression
    validation_folds: Annotated[int, Field(ge=2)] = 5  # select-train's cross-validation
    audit_seed: Annotated[int, Field(ge=0)] = 7  # demo audit list sample / audit sample
    audit_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75  # of the truth's chest CTs
    audit_sample_k: Annotated[int, Field(ge=0)] = 5  # selected + rejected series for review
    unknown_region_min_lung_ml: Annotated[float, Field(ge=0.0)] = 500.0  # see docs/select.md


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
    # fraction of the pandemic-era selected series with a linked PCR test
    min_pcr_coverage: Fraction = 0.5


class PackParams(Section):
    """``pack``: volumes, splits and shards of a release."""

    EXECUTION: ClassVar[frozenset[str]] = frozenset({"workers"})

    spacing_mm: tuple[SpacingMm, SpacingMm, SpacingMm] = (4.0, 4.0, 4.0)
    shape: tuple[Side, Side, Side] = (48, 64, 64)
    hu_min: Hu = -1024
    hu_max: Hu = 3071
    # a case's split = where sha256(salt, site, patient) falls in the fractions (stable)
    split_salt: Annotated[str, Field(min_length=1)] = "ctcurate-split-1"
    split_fractions: tuple[Fraction, Fraction, Fraction] = (0.6, 0.2, 0.2)
    shard_max_cases: PositiveInt = 64
    # each case carries a keyed pseudonym of (site, patient id); the key comes from the
    # environment (ctcurate.pipeline.pack.PSEUDONYM_KEY_ENV) and pack fails without it
    patient_pseudonyms: bool = False
    # cases shown in card.html's gallery (one thumbnail each; beyond it, a sample per site
    # and label); 0: no gallery
    card_gallery_max_cases: Annotated[int, Field(ge=0)] = 500
    # local processes building the volumes (not part of the release: left out of its manifest)
    workers: PositiveInt = 2

    @field_validator("shape")
    @classmethod
    def _check_voxels(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        voxels = shape[0] * shape[1] * shape[2]
        if voxels > MAX_VOXELS:
            msg = f"{voxels} voxels, more than {MAX_VOXELS} (512^3)"
            raise ValueError(msg)
        return shape

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


class AugmentParams(Section):
    """``train.augment``: seeded augmentation of the training patches.

    The transforms live in :mod:`ctcurate.models.augment_ops`.

    Each transform runs on a patch with its probability (0 switches it off); the ranges
    are drawn uniformly. docs/models.md gives where each range comes from.
    """

    affine_prob: Fraction = 0.2  # random scale / rotation, image and labels alike
    scale: tuple[PositiveFloat, PositiveFloat] = (0.85, 1.15)  # per axis
    rotate_deg: tuple[
        Annotated[float, Field(ge=0.0, le=45.0)], Annotated[float, Field(ge=0.0, le=45.0)]
    ] = (10.0, 5.0)  # max |angle| in the axial plane, about the two in-plane axes
    intensity_prob: Fraction = 0.15  # HU scale about water and offset
    hu_scale: tuple[PositiveFloat, PositiveFloat] = (0.9, 1.1)
    hu_offset: tuple[float, float] = (-20.0, 20.0)
    noise_prob: Fraction = 0.15  # white Gaussian noise (coloured by the kernel step after it)
    noise_sd_hu: tuple[NonNegativeFloat, NonNegativeFloat] = (0.0, 50.0)
    kernel_prob: Fraction = 0.2  # Gaussian blur or unsharp-mask sharpening, half each
    blur_sigma_vox: tuple[PositiveFloat, PositiveFloat] = (0.3, 1.0)
    sharpen_amount: tuple[PositiveFloat, PositiveFloat] = (0.3, 1.0)
    resolution_prob: Fraction = 0.25  # resample down then up (thick slices, coarse pixels)
    resolution_z: tuple[
        Annotated[float, Field(ge=1.0, le=8.0)], Annotated[float, Field(ge=1.0, le=8.0)]
    ] = (1.0, 2.5)  # down-sampling factor along z
    resolution_xy: tuple[
        Annotated[float, Field(ge=1.0, le=8.0)], Annotated[float, Field(ge=1.0, le=8.0)]
    ] = (1.0, 1.5)  # down-sampling factor in the axial plane
    lesion_look_prob: Fraction = 0.0  # the lesions rendered again: density, margin, texture
    lesion_contrast: tuple[PositiveFloat, PositiveFloat] = (0.5, 1.1)  # GGO excess over lung
    lesion_edge_vox: tuple[NonNegativeFloat, NonNegativeFloat] = (0.0, 1.5)  # margin blur
    lesion_texture_hu: tuple[NonNegativeFloat, NonNegativeFloat] = (0.0, 40.0)

    @model_validator(mode="after")
    def _check_ranges(self) -> AugmentParams:
        for name in (
            "scale",
            "rotate_deg",
            "hu_scale",
            "hu_offset",
            "noise_sd_hu",
            "blur_sigma_vox",
            "sharpen_amount",
            "resolution_z",
            "resolution_xy",
            "lesion_contrast",
            "lesion_edge_vox",
            "lesion_texture_hu",
        ):
            lo, hi = getattr(self, name)
            if name != "rotate_deg" and lo > hi:
                msg = f"{name}: the low end ({lo:g}) is above the high end ({hi:g})"
                raise ValueError(msg)
        return self


class TrainParams(Section):
    """``train``: segmentation and typicality models.

    The defaults are the CPU demo profile (a few minutes on 2 CPU cores for the demo
    release of 48x64x64 volumes at 4 mm); docs/models.md documents the larger profile and
    the measurements.
    """

    EXECUTION: ClassVar[frozenset[str]] = frozenset({"device", "threads"})

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
    patch: tuple[Side, Side, Side] | None = (32, 64, 64)  # None: whole volumes
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
    # extra copies of each fit case, predicted after every scanner transform of `augment`
    # (HU calibration, noise, kernel, resolution at their ranges): the classifier then meets
    # predictions made on other scanners' images; 0 fits on the cases as they are
    classifier_copies: Annotated[int, Field(ge=0, le=16)] = 0
    # lesion components smaller than this (mm^3) become normal lung; with several values
    # the one with the best mean val lesion Dice is kept (the smallest on a tie)
    min_lesion_mm3: tuple[Annotated[float, Field(ge=0.0)], ...] = Field(
        default=(0.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0), min_length=1
    )
    # where the post-processed lung comes from: the network, or the HU threshold lung mask
    # with the network's lesions (docs/models.md, "Lesion post-processing")
    lung_from: Literal["network", "hu"] = "hu"
    # how far (mm) predicted lesions grow into dense lung next to them; with several values
    # the one with the best mean val lesion Dice is kept (the smallest on a tie)
    lesion_grow_mm: tuple[Annotated[float, Field(ge=0.0)], ...] = Field(
        default=(0.0, 4.0, 8.0), min_length=1
    )
    augment: AugmentParams = AugmentParams()  # all probabilities 0: no augmentation


class EvaluateParams(Section):
    """``evaluate``: metrics on the release's test split."""

    EXECUTION: ClassVar[frozenset[str]] = frozenset({"device", "threads"})

    threshold: Fraction = 0.5
    hu_lung_max: Hu = -400
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


def check_sections(path: Path, data: dict[str, object]) -> None:
    """ParamsError naming the first top-level key of ``data`` that is not a known section."""
    unknown = sorted(str(key) for key in data if key not in Params.model_fields)
    if unknown:
        msg = f"{path}: unknown key '{unknown[0]}' (not a params section)"
        raise ParamsError(msg)


def load_section(path: Path, name: str, model: type[S]) -> S:
    """Load and validate one section of ``params.yaml`` with ``model``.

    The file's other sections are not validated, but every top-level key must name one.
    """
    data = load_yaml(path)
    check_sections(path, data)
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
