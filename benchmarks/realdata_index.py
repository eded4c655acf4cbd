"""``index`` on real public DICOM: what it keeps of the files pydicom reads.

Corpora, in one archive (files linked or copied as they are):

- ``tcia``: ``../shared/realct`` (two TCIA Lung-PET-CT-Dx chest CT patients, CC BY 4.0,
  https://doi.org/10.7937/TCIA.2020.NNC20461), with its CSV, XML and licence files;
- ``pydicom``: the test files inside the pydicom wheel (``pydicom/data/test_files``);
- ``pydicom-data``: the ``pydicom-data`` package (``data_store/data``, MIT);
- ``deid-data``: the ``deid-data`` package (``deid_data/data``, MIT).

The TCIA files keep their folders under one site ``tcia``; each file of the three test
corpora gets a site of its own (``pydicom-007/<name>``): they hold the same images in many
encodings under one SOPInstanceUID, which in one site are (rightly) ``uid_conflict``.

For each corpus: files, files pydicom reads without ``force``, how many of those index
keeps (indexed, or skipped as a DICOMDIR or a byte-identical copy), the single-frame CT
images among them and how many are indexed, and the quarantine reasons with counts. Run
under the default PHI policy, and under a policy that retains the identifying attributes of
the three public test corpora (their names are fictional, but real-looking: the default
policy rightly quarantines them), which measures the reader alone.

    .venv/bin/python benchmarks/realdata_index.py [--realct ../shared/realct] \
        [--extra NAME=DIR ...]

``--extra NAME=DIR`` (repeatable) adds any folder as a corpus laid out like the test
corpora (``NAME-<n>/<file name>``, one file a site) whose identities the second policy
retains too: a public test corpus fetched for development, for example.

Prints a Markdown table (and saves it to ``benchmarks/out/realdata_index.md``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ctcurate.dicom import phi
from ctcurate.io.shards import read_shards
from ctcurate.io.tables import write_parquet
from ctcurate.params import IndexParams
from ctcurate.pipeline import index
from ctcurate.pipeline.snapshot import list_archive

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: The public test corpora whose (fictional) identities a measurement of the reader retains.
TEST_CORPORA = ("pydicom", "pydicom-data", "deid-data")


def retain_policy(sites: list[str], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A PHI policy retaining every identifying attribute of the test corpora's sites."""
    retain = {"actions": dict.fromkeys(phi.ELEMENTS, "retain")}
    public = {*TEST_CORPORA, *extra}
    return {"sites": {s: retain for s in sites if corpus_of(s) in public}}


NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def extra_corpus(text: str) -> tuple[str, Path]:
    """``NAME=DIR`` -> (name, folder); a name must not end in ``-<digits>`` (a site suffix)."""
    name, sep, folder = text.partition("=")
    reserved = {"tcia", *TEST_CORPORA}
    if not sep or not NAME.fullmatch(name) or corpus_of(name) != name or name in reserved:
        msg = f"--extra {text!r}: expected NAME=DIR with a new NAME not ending in -<digits>"
        raise argparse.ArgumentTypeError(msg)
    if not Path(folder).is_dir():
        msg = f"--extra {text!r}: {folder} is not a folder"
        raise argparse.ArgumentTypeError(msg)
    return name, Path(folder)


def corpus_of(site: str) -> str:
    """The corpus of a site folder (``pydicom-007`` -> ``pydicom``)."""
    head, _, tail = site.rpartition("-")
    return head if tail.isdigit() else site


KEPT_SKIPS = frozenset({"dicomdir", "duplicate_identical"})


def package_folder(package: str, *parts: str) -> Path | None:
    """A folder inside an installed package, ``None`` when the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent.joinpath(*parts)
    return folder if folder.is_dir() else None


def corpora(realct: Path | None) -> dict[str, Path]:
    """The corpora found here, by site name."""
    found = {
        "tcia": realct if realct is not None and realct.is_dir() else None,
        "pydicom": package_folder("pydicom", "data", "test_files"),
        "pydicom-data": package_folder("data_store", "data"),
        "deid-data": package_folder("deid_data", "data"),
    }
    return {name: folder for name, folder in found.items() if folder is not None}


def farm(archive: Path, sources: dict[str, Path]) -> list[str]:
    """Link (else copy) every file of each corpus into ``archive``; return the sites.

    TCIA: ``tcia/<path>``; a test corpus: ``<corpus>-<n>/<file name>``, one file a site.
    """
    sites = set()
    for corpus, folder in sources.items():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        for i, src in enumerate(f for f in files if "__pycache__" not in f.parts):
            rel = src.relative_to(folder)
            site = corpus if corpus == "tcia" else f"{corpus}-{i:03d}"
            sites.add(site)
            dest = archive / site / (rel if corpus == "tcia" else rel.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
    return sorted(sites)


@dataclass
class Figures:
    """What index did with one corpus."""

    corpus: str
    files: int = 0
    readable: int = 0
    kept: int = 0
    ct_images: int = 0
    ct_indexed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # quarantined readable files
    other_reasons: Counter[str] = field(default_factory=Counter)  # files pydicom refuses

    def row(self) -> str:
        """One Markdown table row."""

        def pct(n: int, d: int) -> str:
            return f"{n} ({100 * n / d:.0f} %)" if d else "0"

        def counts(c: Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"

        return (
            f"| {self.corpus} | {self.files} | {self.readable} | "
            f"{pct(self.kept, self.readable)} | {self.ct_images} | "
            f"{pct(self.ct_indexed, self.ct_images)} | {counts(self.reasons)} | "
            f"{counts(self.other_reasons)} |"
        )


def pydicom_view(path: Path) -> tuple[bool, bool]:
    """(read by pydicom without force, a single-frame CT image with pixel data)."""
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test corpora's invalid values
        try:
            ds = pydicom.dcmread(path, defer_size=1024)
        except Exception:
            return False, False
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            frames = 1
        return True, ds.get("SOPClassUID") == CT_IMAGE and frames == 1 and "PixelData" in ds


def outcomes(
    archive: Path, out: Path, policy: dict[str, Any] | None = None
) -> dict[str, tuple[str, str | None, str | None]]:
    """Index ``archive`` into ``out`` (one process): ``{path: (status, reason, detail)}``."""
    listing = out.parent / f"{out.name}-listing.parquet"
    write_parquet(listing, list_archive(archive))
    params = IndexParams(workers=1, **({"phi": policy} if policy else {}))
    index.run(archive, listing, out, params, scheduler=None)
    found: dict[str, tuple[str, str | None, str | None]] = {
        p: ("indexed", None, None)
        for p in read_shards(out / "instances", ["path"]).column("path").to_pylist()
    }
    for name, status in (("quarantine", "quarantined"), ("skipped", "skipped")):
        for r in pq.read_table(out / f"{name}.parquet").to_pylist():
            found[r["path"]] = (status, r["reason"], r["detail"])
    return dict(sorted(found.items()))


def measure(archive: Path, out: Path, policy: dict[str, Any] | None = None) -> list[Figures]:
    """Index ``archive`` (one process) and count per corpus."""
    found = outcomes(archive, out, policy)
    by_site: dict[str, Figures] = {}
    for path, (status, reason, _) in found.items():
        site = corpus_of(path.split("/", 1)[0])
        fig = by_site.setdefault(site, Figures(site))
        fig.files += 1
        readable, ct = pydicom_view(archive / path)
        kept = status == "indexed" or reason in KEPT_SKIPS
        if readable:
            fig.readable += 1
            fig.kept += kept
            fig.ct_images += ct
            fig.ct_indexed += ct and status == "indexed"
            if status == "quarantined":
                fig.reasons[str(reason)] += 1
        elif status == "quarantined":
            fig.other_reasons[str(reason)] += 1
    return [by_site[s] for s in sorted(by_site)]


HEADER = (
    "| corpus | files | pydicom reads | index keeps | single-frame CT | CT indexed | "
    "quarantined (pydicom reads them) | quarantined (pydicom does not) |\n"
    "|---|---:|---:|---:|---:|---:|---|---|"
)


def main() -> None:
    """Measure every corpus found under both policies and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realct", type=Path, default=ROOT.parent / "shared" / "realct")
    parser.add_argument("--extra", type=extra_corpus, action="append", default=[])
    args = parser.parse_args()
    sources = corpora(args.realct)
    extra = dict(args.extra)
    if len(extra) != len(args.extra):
        parser.error("--extra: a NAME given twice")
    sources.update(extra)
    lines = [] if "tcia" in sources else [f"(no TCIA corpus: {args.realct} is not a folder)"]
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        sites = farm(archive, sources)
        for title, policy in (
            ("default PHI policy", None),
            ("test corpora's identities retained", retain_policy(sites, tuple(extra))),
        ):
            figures = measure(archive, Path(tmp) / title.replace(" ", "_"), policy)
            lines += [f"\n{title}:\n", HEADER, *(f.row() for f in figures)]
    text = "\n".join(lines) + "\n"
    OUT.mkdir(exist_ok=True)
    (OUT / "realdata_index.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
