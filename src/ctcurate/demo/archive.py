"""Writing the archive: every planned study to DICOM files in its site's layout, with traps.

:class:`ArchiveWriter` turns :class:`~ctcurate.demo.cohort.Study` plans into files under
``archive/<site>/``, lesion SEGs under ``annotations/seg/`` and the truth rows describing
both. Only counts are logged.
"""

from __future__ import annotations

import calendar
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ctcurate.demo import extras
from ctcurate.demo.anatomy import Grid, make_chest, reconstruct, scan_range, thick_average
from ctcurate.demo.cohort import THICK_MM, Study, uid
from ctcurate.demo.dicomwrite import (
    SeriesInfo,
    cr_image,
    ct_series,
    dose_report,
    encode,
    encode_series,
    localizer,
    mr_series,
)
from ctcurate.demo.lesions import add_pattern
from ctcurate.demo.preview import Tile
from ctcurate.demo.vendors import SITE_BY_CODE, SITES, SeriesKey, Site, series_files
from ctcurate.dicom.seg import write_seg
from ctcurate.params import SynthParams

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def study_mtime(date: dt.date) -> int:
    """Fixed file modification time of a study's files: noon UTC of its study date."""
    return calendar.timegm(date.timetuple()) + 12 * 3600


@dataclass
class TruthRow:
    """One generated series (see docs/data.md, truth.parquet)."""

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    site: str
    kind: str
    pattern: str | None
    pneumonia: bool
    covid: bool
    era: str
    study_date: dt.date
    severity: float
    expected_quarantine: str | None
    duplicate_of: str | None
    border_consolidation: bool


@dataclass
class ArchiveWriter:
    """Writes studies into ``root`` (the output folder holding archive/ and annotations/)."""

    root: Path
    seed: int
    matrix: int
    #: The ``synth`` section whose drawing options (``pleural_consolidation``,
    #: ``dependent_atelectasis``, ``vessel_trees``...) the chests are rendered with; its
    #: defaults draw the demo's chests. ``seed`` and ``matrix`` above are the writer's own
    #: (the header-heavy archive writes 16-pixel images that the section does not allow).
    options: SynthParams = field(default_factory=SynthParams)
    truth: list[TruthRow] = field(default_factory=list)
    trap_files: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    tiles: list[Tile] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    n_files: int = 0

    @property
    def archive(self) -> Path:
        """The archive folder (one sub-folder per site)."""
        return self.root / "archive"

    # -- files -------------------------------------------------------------------------
    def write_file(self, rel: str, data: bytes, mtime: int) -> None:
        path = self.archive / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (mtime, mtime))
        self.n_files += 1

    def _names(self, site: Site, study: Study, datasets: list[Dataset]) -> list[str]:
        """Archive-relative paths of a series' files in the site's layout."""
        first = datasets[0]
        return self.names_for(
            site,
            study,
            str(first.SeriesInstanceUID),
            int(first.SeriesNumber),
            [str(ds.SOPInstanceUID) for ds in datasets],
        )

    def names_for(
        self, site: Site, study: Study, series_uid: str, series_number: int, sop_uids: list[str]
    ) -> list[str]:
        """Archive-relative paths of a series' files (by UIDs) in the site's layout."""
        key = SeriesKey(
            patient_id=study.patient_id,
            patient_index=study.patient_index,
            study_index=study.index,
            study_uid=study.study_uid,
            study_date=study.study_date.strftime("%Y%m%d"),
            series_uid=series_uid,
            series_number=series_number,
        )
        counter = self.counters.get(site.code, 0)
        self.counters[site.code] = counter + len(sop_uids)
        return [f"{site.code}/{name}" for name in series_files(site, key, sop_uids, counter)]

    def add_truth(self, study: Study, series_uid: str, kind: str, **kw: object) -> None:
        row = TruthRow(
            series_instance_uid=series_uid,
            study_instance_uid=study.study_uid,
            patient_id=study.patient_id,
            site=str(kw.get("site", study.site)),
            kind=kind,
            pattern=study.pattern,
            pneumonia=study.pneumonia,
            covid=study.covid,
            era=study.era,
            study_date=study.study_date,
            severity=study.severity,
            expected_quarantine=kw.get("quarantine"),  # type: ignore[arg-type]
            duplicate_of=kw.get("duplicate_of"),  # type: ignore[arg-type]
            border_consolidation=study.border,
        )
        self.truth.append(row)

    def _series(
        self,
        study: Study,
        datasets: list[Dataset],
        names: list[str] | None = None,
        syntax: str = "explicit",
    ) -> tuple[list[str], list[bytes]]:
        """Encode and write one series; returns its paths and bytes in instance order."""
        if names is None:
            names = self._names(SITE_BY_CODE[study.site], study, datasets)
        if syntax == "explicit":
            blobs = encode_series(datasets)
        else:
            blobs = [encode(ds, syntax) for ds in datasets]
        mtime = study_mtime(study.study_date)
        for name, blob in zip(names, blobs, strict=True):
            self.write_file(name, blob, mtime)
        if syntax != "explicit":
            series = str(datasets[0].SeriesInstanceUID)
            self.trap_files.extend((n, f"{syntax}_lossless", None, series) for n in names)
        return names, blobs

    # -- studies -------------------------------------------------------------------------
    def write_study(self, study: Study) -> None:
        """Write every series of one study (and its SEG, traps and truth rows)."""
        if study.kind == "chest":
            self._chest(study)
        else:
            self._other(study)

    def series_info(
        self, study: Study, name: str, number: int, desc: str, kernel: str, image_type: str
    ) -> SeriesInfo:
        leak = None
        for trap in study.traps:
            if trap.startswith("phi_") and (
                (trap == "phi_birth_date" and name == "localizer") or trap != "phi_birth_date"
            ):
                leak = trap
        return SeriesInfo(
            series_uid=uid(self.seed, "series", study.index, name),
            frame_uid=uid(self.seed, "frame", study.index),
            number=number,
            description=desc,
            kernel=kernel,
            image_type=image_type,
            leak=leak,
        )

    def _chest(self, study: Study) -> None:
        rng = np.random.default_rng(study.seed)
        site = SITE_BY_CODE[study.site]
        vendor = site.vendor
        top, bottom = scan_range(study.body)
        z = np.arange(top, bottom - 1e-6, -study.thickness)
        matrix = site.matrix(self.matrix)
        pixel = study.fov / matrix
        chest = make_chest(
            rng, study.body, Grid(z=z, matrix=matrix, pixel=pixel), self.options.vessel_trees
        )
        pattern = study.pattern or "negative"
        hu, labels, _ = add_pattern(
            rng,
            chest,
            pattern,
            study.severity,
            study.border,
            copy=False,
            pleural=self.options.pleural_consolidation,
            atelectasis=self.options.dependent_atelectasis,
        )
        del chest  # the phantom's coordinate volumes: the painted HU and labels carry on
        offset = -round(float(rng.uniform(40.0, 220.0)), 1)
        sn_loc, sn_thin, sn_thick, sn_dose = vendor.series_numbers

        loc = self.series_info(
            study,
            "localizer",
            sn_loc,
            vendor.localizer,
            vendor.soft_kernel,
            "ORIGINAL\\PRIMARY\\LOCALIZER",
        )
        ds = localizer(study, site, loc, hu, uid(self.seed, "sop", loc.series_uid, 0), top + offset)
        names, _ = self._series(study, [ds])
        self.add_truth(
            study, loc.series_uid, "localizer", quarantine="phi_present" if loc.leak else None
        )
        if loc.leak:
            self.trap_files.append((names[0], loc.leak, "phi_present", loc.series_uid))

        thin = self.series_info(
            study,
            "thin",
            sn_thin,
            vendor.thin_description(study.thickness),
            vendor.lung_kernel,
            "ORIGINAL\\PRIMARY\\AXIAL",
        )
        image = reconstruct(rng, hu, sharpness=0.85, noise_hu=18.0)
        sops = [uid(self.seed, "sop", thin.series_uid, i) for i in range(z.size)]
        datasets = ct_series(study, site, thin, image, z, pixel, study.thickness, sops, offset)
        all_labels = labels
        if "duplicate_slice" in study.traps:
            j = min(z.size - 1, z.size // 2 + 3)
            dup = ct_series(
                study,
                site,
                thin,
                image[j : j + 1],
                z[j : j + 1],
                pixel,
                study.thickness,
                [uid(self.seed, "sop-dup", thin.series_uid)],
                offset,
            )[0]
            dup.InstanceNumber = z.size + 1
            datasets.append(dup)
            all_labels = np.concatenate([labels, labels[j : j + 1]])
        all_names = self._names(site, study, datasets)
        keep = list(range(len(datasets)))
        if "missing_slice" in study.traps:
            gone = z.size // 2
            keep.remove(gone)
            self.trap_files.append((all_names[gone], "missing_slice", None, thin.series_uid))
        written = [datasets[i] for i in keep]
        names = [all_names[i] for i in keep]
        if "shuffled_names" in study.traps:
            names = [names[i] for i in rng.permutation(len(names))]
            self.trap_files.extend((n, "shuffled_names", None, thin.series_uid) for n in names)
        syntax = "explicit"
        if "rle_lossless" in study.traps:
            syntax = "rle"
        elif "jpeg2000_lossless" in study.traps:
            syntax = "jpeg2000"
        # the SEG references each position once: the duplicate slice stays unreferenced
        seg_keep = [i for i in keep if i < z.size]
        write_seg(
            self.root / "annotations" / "seg" / f"{thin.series_uid}.dcm",
            [datasets[i] for i in seg_keep],
            all_labels[seg_keep],
        )
        names, blobs = self._series(study, written, names, syntax)
        self.add_truth(study, thin.series_uid, "chest_ct")
        if "duplicate_slice" in study.traps:
            self.trap_files.append((all_names[-1], "duplicate_slice", None, thin.series_uid))
        if "duplicate_site" in study.traps:
            self._copy_to_other_site(study, written, blobs)
        mid = int(np.argmax((labels > 1).sum(axis=(1, 2)))) if (labels > 1).any() else z.size // 2
        self.tiles.append(
            # copies: a view of one slice would keep the whole volume alive
            Tile(
                f"{study.site} {study.pattern} sev {study.severity:.2f}",
                image[mid].copy(),
                labels[mid].copy(),
            )
        )

        if study.thick:
            thick = self.series_info(
                study,
                "thick",
                sn_thick,
                vendor.thick_description(),
                vendor.soft_kernel,
                "ORIGINAL\\PRIMARY\\AXIAL",
            )
            z_thick = np.arange(top - THICK_MM / 2, bottom, -THICK_MM)
            vol = reconstruct(rng, thick_average(hu, z, z_thick, THICK_MM), 0.3, 7.0)
            sops = [uid(self.seed, "sop", thick.series_uid, i) for i in range(z_thick.size)]
            ds_thick = ct_series(study, site, thick, vol, z_thick, pixel, THICK_MM, sops, offset)
            syntax = "jpegls" if "jpegls_lossless" in study.traps else "explicit"
            names, blobs = self._series(study, ds_thick, syntax=syntax)
            self.add_truth(study, thick.series_uid, "chest_ct_soft")
            if "truncated" in study.traps:
                self.truncate(study, names, blobs, thick.series_uid)

        dose = self.series_info(
            study, "dose", sn_dose, vendor.dose, "", "DERIVED\\SECONDARY\\SCREEN SAVE"
        )
        ds = dose_report(study, site, dose, matrix, uid(self.seed, "sop", dose.series_uid, 0))
        self._series(study, [ds])
        self.add_truth(study, dose.series_uid, "dose_report")

    def truncate(self, study: Study, names: list[str], blobs: list[bytes], series: str) -> None:
        """Cut one file inside its pixel data and another just before it."""
        mtime = study_mtime(study.study_date)
        inside, before = names[1], names[2]
        blob = blobs[1]
        self._rewrite(inside, blob[: len(blob) - len(blob) // 8], mtime)
        self.trap_files.append((inside, "truncated_pixels", "pixel_length_short", series))
        blob = blobs[2]
        cut = blob.rfind(_PIXEL_DATA_TAG)
        self._rewrite(before, blob[:cut], mtime)
        self.trap_files.append((before, "truncated_header", "no_pixel_data", series))

    def _rewrite(self, rel: str, data: bytes, mtime: int) -> None:
        path = self.archive / rel
        path.write_bytes(data)
        os.utime(path, (mtime, mtime))

    def _copy_to_other_site(
        self, study: Study, datasets: list[Dataset], blobs: list[bytes]
    ) -> None:
        """The same series sent by a second hospital: identical bytes, that site's layout."""
        first = datasets[0]
        self.copy_to_other_site(
            study,
            str(first.SeriesInstanceUID),
            int(first.SeriesNumber),
            [str(ds.SOPInstanceUID) for ds in datasets],
            blobs,
        )

    def copy_to_other_site(
        self,
        study: Study,
        series: str,
        series_number: int,
        sop_uids: list[str],
        blobs: list[bytes],
    ) -> None:
        """Write ``blobs`` again under the next site, recorded as ``duplicate_site``."""
        codes = [s.code for s in SITES]
        other = SITE_BY_CODE[codes[(codes.index(study.site) + 1) % len(codes)]]
        copies = self.names_for(other, study, series, series_number, sop_uids)
        mtime = study_mtime(study.study_date)
        for name, blob in zip(copies, blobs, strict=True):
            self.write_file(name, blob, mtime)
            self.trap_files.append((name, "duplicate_site", None, series))
        self.add_truth(study, series, "chest_ct", site=other.code, duplicate_of=series)

    def _other(self, study: Study) -> None:
        rng = np.random.default_rng(study.seed)
        site = SITE_BY_CODE[study.site]
        vendor = site.vendor
        kind = {"head": "head_ct", "abdomen": "abdomen_ct", "mr": "mr", "cr": "cr"}[study.kind]
        matrix = max(32, site.matrix(self.matrix) // 2)
        if study.kind == "head":
            info = self.series_info(
                study, kind, 2, "Head 5mm", vendor.soft_kernel, "ORIGINAL\\PRIMARY\\AXIAL"
            )
            pixel = study.fov / matrix
            hu = extras.head_hu(rng, matrix, pixel, extras.HEAD_SLICES)
            z = -5.0 * np.arange(extras.HEAD_SLICES)
            sops = [uid(self.seed, "sop", info.series_uid, i) for i in range(z.size)]
            datasets = ct_series(study, site, info, hu, z, pixel, 5.0, sops, 0.0)
        elif study.kind == "abdomen":
            info = self.series_info(
                study, kind, 3, "Abdomen 5mm", vendor.soft_kernel, "ORIGINAL\\PRIMARY\\AXIAL"
            )
            pixel = study.fov / matrix
            height = study.body.lung_height
            z = -height - 10.0 - 5.0 * np.arange(extras.ABDOMEN_SLICES)
            grid = Grid(z=z, matrix=matrix, pixel=pixel)
            chest = make_chest(rng, study.body, grid, self.options.vessel_trees)
            hu = reconstruct(rng, chest.hu, 0.3, 8.0)
            sops = [uid(self.seed, "sop", info.series_uid, i) for i in range(z.size)]
            datasets = ct_series(study, site, info, hu, z, pixel, 5.0, sops, -300.0)
        elif study.kind == "mr":
            info = self.series_info(study, kind, 5, "T1 SE AX", "", "ORIGINAL\\PRIMARY\\M\\ND")
            image = extras.head_mr(rng, matrix, extras.MR_SLICES)
            sops = [uid(self.seed, "sop", info.series_uid, i) for i in range(extras.MR_SLICES)]
            datasets = mr_series(study, site, info, image, sops)
        else:
            info = self.series_info(study, kind, 1, "Chest PA", "", "ORIGINAL\\PRIMARY")
            top, bottom = scan_range(study.body)
            grid = Grid(z=np.arange(top, bottom, -6.0), matrix=48, pixel=400.0 / 48)
            image = extras.radiograph(
                make_chest(rng, study.body, grid, self.options.vessel_trees), 2 * matrix
            )
            datasets = [
                cr_image(study, site, info, image, uid(self.seed, "sop", info.series_uid, 0))
            ]
        names, _ = self._series(study, datasets)
        self.add_truth(
            study, info.series_uid, kind, quarantine="phi_present" if info.leak else None
        )
        if info.leak:
            self.trap_files.extend((n, info.leak, "phi_present", info.series_uid) for n in names)

    def write_non_dicom(self) -> None:
        """Files a hospital export carries besides DICOM: notes, thumbnails, empty files."""
        fixed = calendar.timegm((2021, 12, 31, 12, 0, 0))
        extra = [
            ("H01/Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504), "thumbs_db"),
            ("H02/notes.txt", b"export batch 7: resend of missing series pending\n", "text"),
            ("H03/DICOM/IM999999", b"", "zero_bytes"),
            ("H04/export.log", b"transfer finished, 0 errors\n", "text"),
            ("H05/00000000.tmp", b"", "zero_bytes"),
        ]
        for rel, data, trap in extra:
            self.write_file(rel, data, fixed)
            self.trap_files.append((rel, f"non_dicom_{trap}", "not_dicom", None))
