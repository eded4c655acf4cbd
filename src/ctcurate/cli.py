"""The ``ctcurate`` command line: one short command per DVC stage, no logic.

Each command parses its options, loads and validates its ``params.yaml`` section and calls
the stage's ``run``. A :class:`~ctcurate.errors.CtcurateError` ends in one line on stderr
and a non-zero exit.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ctcurate import __version__
from ctcurate.errors import CtcurateError, OutputError
from ctcurate.params import (
    AnnotateJoinParams,
    EvaluateParams,
    IndexParams,
    PackParams,
    S,
    SelectParams,
    SnapshotParams,
    SynthParams,
    TrainParams,
    load_section,
)

app = typer.Typer(
    name="ctcurate",
    help=(
        "Turn an archive of anonymized CT DICOM into curated, versioned AI datasets "
        "(snapshot, index, select, annotate-join, pack) and train / evaluate models on them."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[
    Path,
    typer.Option("--params", help="params.yaml holding this stage's section.", dir_okay=False),
]
DEFAULT_PARAMS = Path("params.yaml")
#: Where `select` keeps its rule files and body region vocabulary in this repository.
DEFAULT_RULES = Path("stages/select")
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        help="Dask scheduler address (tcp://HOST:PORT); the local pool of `workers` if omitted."
    ),
]


def _section_or_default(params: Path, name: str, model: type[S]) -> S:
    """The validated section; the model's defaults when the default params file is absent."""
    if params == DEFAULT_PARAMS and not params.exists():
        return model()
    return load_section(params, name, model)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctcurate {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Curated, versioned CT datasets."""


@app.command()
def synth(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Folder to write archive/, annotations/ and truth.parquet into.",
            file_okay=False,
        ),
    ],
    patients: Annotated[
        int | None, typer.Option(help="Number of patients (overrides params).", min=1)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (overrides params).", min=0)] = None,
    header_heavy: Annotated[
        int | None,
        typer.Option(
            "--header-heavy",
            help="Instead: write at least N small instances (tiny images, full headers) "
            "for index benchmarks; uses the seed only.",
            min=1,
        ),
    ] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Generate the built-in synthetic multi-hospital CT archive."""
    from ctcurate.pipeline import synth as stage

    section = _section_or_default(params, "synth", SynthParams)
    overrides = {k: v for k, v in {"patients": patients, "seed": seed}.items() if v is not None}
    if overrides:
        section = SynthParams.model_validate(section.model_dump() | overrides)
    if header_heavy is not None:
        stage.write_header_heavy(out=out, n_instances=header_heavy, seed=section.seed)
        return
    stage.run(out=out, params=section)


@app.command()
def snapshot(
    archive: Annotated[
        Path, typer.Option("--archive", help="Archive root folder.", file_okay=False)
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Listing Parquet file to write.", dir_okay=False)
    ],
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """List the archive (relative path, size, mtime), sorted, into one Parquet file."""
    from ctcurate.pipeline import snapshot as stage

    stage.run(
        archive=archive, out=out, params=_section_or_default(params, "snapshot", SnapshotParams)
    )


@app.command()
def index(
    archive: Annotated[
        Path, typer.Option("--archive", help="Archive root folder.", file_okay=False)
    ],
    snapshot: Annotated[
        Path, typer.Option("--snapshot", help="Listing from `snapshot`.", dir_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="Index folder to write.", file_okay=False)],
    workers: Annotated[
        int | None, typer.Option(help="Local worker processes (overrides params).", min=1)
    ] = None,
    scheduler: SchedulerOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Read DICOM headers into instances / series / quarantine tables and a DuckDB catalog."""
    from ctcurate.pipeline import index as stage

    section = _section_or_default(params, "index", IndexParams)
    if workers is not None:
        section = IndexParams.model_validate(section.model_dump() | {"workers": workers})
    stage.run(archive=archive, snapshot=snapshot, out=out, params=section, scheduler=scheduler)


class QueryFormat(StrEnum):
    """Output formats of ``ctcurate query``."""

    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the views instances, series, quarantine.")],
    catalog: Annotated[
        Path, typer.Option("--catalog", help="catalog.duckdb from `index`.", dir_okay=False)
    ] = Path("data/index/catalog.duckdb"),
    fmt: Annotated[
        QueryFormat, typer.Option("--format", help="Output format.")
    ] = QueryFormat.table,
) -> None:
    """Ad-hoc cohort queries over the index catalog."""
    from ctcurate.pipeline import query as stage

    sys.stdout.write(stage.run(catalog=catalog, sql=sql, fmt=fmt.value))


@app.command("select")
def select_(
    index: Annotated[
        Path, typer.Option("--index", help="Index folder from `index`.", file_okay=False)
    ],
    rules: Annotated[
        Path, typer.Option("--rules", help="Folder of *.sql rule files.", file_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="Selection folder to write.", file_okay=False)],
    truth: Annotated[
        Path | None,
        typer.Option(
            "--truth",
            help="Synthetic ground truth, for precision / recall in the report.",
            dir_okay=False,
        ),
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option(
            "--archive", help="Archive root (pixels of the rule survivors).", file_okay=False
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Pneumonia selector from `select-train`.", dir_okay=False),
    ] = None,
    seg: Annotated[
        Path | None,
        typer.Option(
            "--seg",
            help="Folder of DICOM SEGs (<series uid>.dcm) for the lung-mask Dice audit.",
            file_okay=False,
        ),
    ] = None,
    scheduler: SchedulerOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Apply the selection rules, the pneumonia scorer and the era split to the series."""
    from ctcurate.pipeline import select as stage

    stage.run(
        index_dir=index,
        rules_dir=rules,
        out=out,
        truth=truth,
        params=_section_or_default(params, "select", SelectParams),
        archive=archive,
        model=model,
        seg_dir=seg,
        scheduler=scheduler,
    )


@app.command("select-audit-list")
def select_audit_list(
    truth: Annotated[
        Path, typer.Option("--truth", help="Synthetic ground truth (demo).", dir_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="Audit list CSV to write.", dir_okay=False)],
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Draw the demo's pneumonia audit list from the synthetic ground truth."""
    from ctcurate.pipeline import select_train as stage

    stage.run_audit_list(
        truth=truth, out=out, params=_section_or_default(params, "select", SelectParams)
    )


@app.command("select-train")
def select_train(
    index: Annotated[
        Path, typer.Option("--index", help="Index folder from `index`.", file_okay=False)
    ],
    archive: Annotated[
        Path, typer.Option("--archive", help="Archive root folder.", file_okay=False)
    ],
    audit_list: Annotated[
        Path,
        typer.Option(
            "--audit-list", help="CSV: series_instance_uid,site,pneumonia.", dir_okay=False
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Selector model JSON to write.", dir_okay=False)
    ],
    validation: Annotated[
        Path | None,
        typer.Option(
            "--validation",
            help="Also write the fit's cross-validated and leave-one-site-out figures here.",
            dir_okay=False,
        ),
    ] = None,
    review: Annotated[
        Path | None,
        typer.Option(
            "--review",
            help="Also write the audited series, largest held-out disagreement first (CSV).",
            dir_okay=False,
        ),
    ] = None,
    scheduler: SchedulerOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Fit the pneumonia selector on a labelled audit list."""
    from ctcurate.pipeline import select_train as stage

    stage.run(
        index_dir=index,
        archive=archive,
        audit_list=audit_list,
        out=out,
        params=_section_or_default(params, "select", SelectParams),
        scheduler=scheduler,
        validation=validation,
        review=review,
    )


@app.command("annotate-join")
def annotate_join(
    selected: Annotated[
        Path, typer.Option("--selected", help="series.parquet from `select`.", dir_okay=False)
    ],
    annotations: Annotated[
        Path,
        typer.Option("--annotations", help="Folder with pcr.csv and grades.csv.", file_okay=False),
    ],
    out: Annotated[Path, typer.Option("--out", help="Cases folder to write.", file_okay=False)],
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Link PCR results and reader grades to the selected series."""
    from ctcurate.pipeline import annotate_join as stage

    stage.run(
        selected=selected,
        annotations_dir=annotations,
        out=out,
        params=_section_or_default(params, "annotate_join", AnnotateJoinParams),
    )


@app.command()
def pack(
    cases: Annotated[
        Path, typer.Option("--cases", help="cases.parquet from `annotate-join`.", dir_okay=False)
    ],
    index: Annotated[
        Path, typer.Option("--index", help="Index folder from `index`.", file_okay=False)
    ],
    archive: Annotated[
        Path, typer.Option("--archive", help="Archive root folder.", file_okay=False)
    ],
    annotations: Annotated[
        Path,
        typer.Option(
            "--annotations", help="Folder with seg/ lesion masks (DICOM SEG).", file_okay=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Release folder to write.", file_okay=False)],
    scheduler: SchedulerOpt = None,
    rules: Annotated[
        list[Path] | None,
        typer.Option(
            "--rules", help="Rule file or folder to record by hash in the manifest (repeatable)."
        ),
    ] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Build a content-addressed HDF5 release (volumes, masks, labels, splits, manifest)."""
    from ctcurate.pipeline import pack as stage

    stage.run(
        cases=cases,
        index_dir=index,
        archive=archive,
        annotations_dir=annotations,
        out=out,
        params=_section_or_default(params, "pack", PackParams),
        scheduler=scheduler,
        rules=rules or (),
    )


class DiffFormat(StrEnum):
    """Output formats of ``ctcurate diff``."""

    markdown = "markdown"
    json = "json"


@app.command()
def diff(
    old: Annotated[Path, typer.Argument(help="The earlier release folder.", file_okay=False)],
    new: Annotated[Path, typer.Argument(help="The later release folder.", file_okay=False)],
    fmt: Annotated[
        DiffFormat, typer.Option("--format", help="markdown (a PR comment) or json.")
    ] = DiffFormat.markdown,
) -> None:
    """What changed between two releases: cases, labels, splits, counts, params, rules."""
    from ctcurate.release import diff as stage

    typer.echo(stage.run(old, new, "json" if fmt is DiffFormat.json else "markdown"), nl=False)


@app.command()
def verify(
    release: Annotated[
        Path, typer.Argument(help="Release folder holding manifest.json.", file_okay=False)
    ],
    expect: Annotated[
        str | None,
        typer.Option(
            "--expect",
            help="Release id the release must have (from dvc.lock in git; see docs/release.md).",
        ),
    ] = None,
) -> None:
    """Check a release against its manifest (and an expected id); non-zero exit on a mismatch."""
    from ctcurate import release as stage

    typer.echo(stage.verify(release, expect=expect))


class ExportFormat(StrEnum):
    """Output formats of ``ctcurate export``."""

    nnunet = "nnunet"
    monai = "monai"
    nifti = "nifti"


@app.command()
def export(
    release: Annotated[
        Path, typer.Option("--release", help="Release folder from `pack`.", file_okay=False)
    ],
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", help="nnunet (v2 raw dataset), monai (datalist) or nifti."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Export folder: new, empty or an earlier export.", file_okay=False
        ),
    ],
) -> None:
    """Write a verified release as NIfTI files for nnU-Net v2, MONAI or other tools."""
    from ctcurate.pipeline import export as stage

    choice: dict[ExportFormat, stage.Format] = {
        ExportFormat.nnunet: "nnunet",
        ExportFormat.monai: "monai",
        ExportFormat.nifti: "nifti",
    }
    typer.echo(stage.run(release, out, choice[fmt]))


@app.command()
def train(
    release: Annotated[
        Path, typer.Option("--release", help="Release folder from `pack`.", file_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="Models folder to write.", file_okay=False)],
    live: Annotated[
        Path, typer.Option("--live", help="DVCLive folder for training curves.", file_okay=False)
    ] = Path("dvclive/train"),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Train the lung / lesion segmentation and typicality models on a release."""
    from ctcurate.pipeline import train as stage

    stage.run(
        release=release,
        out=out,
        live=live,
        params=_section_or_default(params, "train", TrainParams),
    )


@app.command()
def evaluate(
    release: Annotated[
        Path, typer.Option("--release", help="Release folder from `pack`.", file_okay=False)
    ],
    models: Annotated[
        Path, typer.Option("--models", help="Models folder from `train`.", file_okay=False)
    ],
    metrics: Annotated[
        Path, typer.Option("--metrics", help="Metrics JSON file to write.", dir_okay=False)
    ],
    plots: Annotated[
        Path, typer.Option("--plots", help="Folder for plot data and images.", file_okay=False)
    ],
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Evaluate the models on the release's test split."""
    from ctcurate.pipeline import evaluate as stage

    stage.run(
        release=release,
        models=models,
        metrics=metrics,
        plots=plots,
        params=_section_or_default(params, "evaluate", EvaluateParams),
    )


@app.command()
def predict(
    models: Annotated[
        Path, typer.Option("--models", help="Models folder from `train`.", file_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write.", file_okay=False)],
    series: Annotated[
        Path | None,
        typer.Option("--series", help="Folder of one DICOM CT series.", file_okay=False),
    ] = None,
    selected: Annotated[
        Path | None,
        typer.Option("--selected", help="series.parquet from `select` (batch).", dir_okay=False),
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option("--index", help="Index folder from `index` (batch).", file_okay=False),
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option("--archive", help="Archive root folder (batch).", file_okay=False),
    ] = None,
    release: Annotated[
        Path | None,
        typer.Option(
            "--release",
            help="Release whose recorded grid (and pack params) to use for its cases.",
            file_okay=False,
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes (batch).", min=1)] = 1,
    scheduler: SchedulerOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    rules: Annotated[
        Path,
        typer.Option(
            "--rules",
            help="Folder holding select's body_region.yaml: --series refuses a series whose "
            "headers name another region than the chest (not checked when the default folder "
            "is absent).",
            file_okay=False,
        ),
    ] = DEFAULT_RULES,
    any_region: Annotated[
        bool, typer.Option("--any-region", help="--series: predict whatever region it shows.")
    ] = False,
) -> None:
    """Apply the trained models to one CT series or to the selected series: SEG, JSON, PNG."""
    from ctcurate.errors import InputError
    from ctcurate.pipeline import predict as tool
    from ctcurate.pipeline import predict_batch

    pack_params = _section_or_default(params, "pack", PackParams)
    eval_params = _section_or_default(params, "evaluate", EvaluateParams)
    if (series is None) == (selected is None):
        msg = "predict: give either --series DIR or --selected F (with --index and --archive)"
        raise InputError(msg)
    if series is not None:
        regions = None
        if not any_region and (rules != DEFAULT_RULES or rules.is_dir()):
            from ctcurate.selection.region import VOCABULARY_FILE, read_vocabulary

            regions = read_vocabulary(rules / VOCABULARY_FILE)
        tool.run_series(series, models, out, pack_params, eval_params, release, regions)
        return
    if selected is None or index is None or archive is None:
        msg = "predict: --selected needs --index and --archive"
        raise InputError(msg)
    predict_batch.run_batch(
        selected,
        index,
        archive,
        models,
        out,
        pack_params,
        eval_params,
        release=release,
        workers=workers,
        scheduler=scheduler,
    )


@app.command("lung-mask")
def lung_mask(
    series: Annotated[
        Path, typer.Option("--series", help="Folder of one DICOM CT series.", file_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="DICOM SEG file to write.", dir_okay=False)],
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Write the pneumonia selector's lung mask of one CT series as a DICOM SEG."""
    from ctcurate.pipeline import lung_mask as tool

    tool.run(series, out, _section_or_default(params, "select", SelectParams))


def main() -> None:
    """Console entry point: user errors become one line and a non-zero exit."""
    try:
        app()
    except CtcurateError as exc:
        sys.stderr.write(f"ctcurate: error: {exc}\n")
        sys.exit(exc.exit_code)
    except OSError as exc:
        from ctcurate.io.outputs import is_disk_full

        if not is_disk_full(exc):
            raise
        sys.stderr.write("ctcurate: error: no space left on the device; nothing was replaced\n")
        sys.exit(OutputError.exit_code)
