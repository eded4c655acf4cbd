"""Header-heavy mode: a large archive of small but valid instances, for index benchmarks.

Every instance carries the full header of its site and vendor (the same builders as the
demo archive), realistic slice counts, thicknesses, positions and folder layouts, but only
a tiny pixel matrix (:data:`HH_MATRIX`) holding a coarse chest / head outline. A small
fraction of the studies carry the usual traps, recorded in ``truth_files.parquet``; there
are no lesions, annotations or preview.

Speed: a CT series is encoded once as a template; each instance is that template's bytes
with five elements spliced in (SOP Instance UID, Instance Number, Image Position, Slice
Location, Pixel Data), so writing costs little more than the file system calls.
"""

from __future__ import annotations

import datetime as dt
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info

from ctcurate.demo.anatomy import Body, sample_body, scan_range
from ctcurate.demo.archive import ArchiveWriter, study_mtime
from ctcurate.demo.cohort import (
    CHEST_TRAPS,
    FIRST_DATE,
    LAST_DATE,
    THICK_MM,
    Study,
    era_of,
    patient_pseudonym,
    uid,
)
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
from ctcurate.demo.truth import OUTPUT_MTIME, OWN_FILES, pin_mtimes, truth_files_table, truth_table
from ctcurate.demo.vendors import SITE_BY_CODE, SITES, Site
from ctcurate.io.outputs import guarded_output, marked_dir
from ctcurate.io.tables import write_parquet
from ctcurate.log import get_logger, progress

__all__ = ["HH_MATRIX", "SeriesTemplate", "plan_header_heavy", "write_header_heavy"]

HH_MATRIX = 16
"""Rows and columns of every header-heavy CT image."""
TRAP_EVERY = 25
"""One chest study in this many carries a trap (cycling through :data:`CHEST_TRAPS`)."""
EXTRA_EVERY = 12
"""One non-chest study (head CT, abdomen CT, MR, CR in turn) per this many chest studies."""
HEAD_SLICES, ABDOMEN_SLICES, MR_SLICES = 30, 80, 20
PANDEMIC_START = dt.date(2020, 1, 1)

_SOP_UID, _INSTANCE_NUMBER, _POSITION = 0x00080018, 0x00200013, 0x00200032
_SLICE_LOCATION, _PIXEL_DATA = 0x00201041, 0x7FE00010
_VARIABLE = (_SOP_UID, _INSTANCE_NUMBER, _POSITION, _SLICE_LOCATION, _PIXEL_DATA)
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
_EXTRA_KINDS = ("head", "abdomen", "mr", "cr")
_THIN_SYNTAX = {"rle_lossless": "rle", "jpeg2000_lossless": "jpeg2000"}


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element (value padded to even length)."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode("ascii"))
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _encoded(elem_tag: int, ds: Dataset) -> bytes:
    part = DicomBytesIO()
    part.is_little_endian, part.is_implicit_VR = True, False
    write_data_element(part, ds[elem_tag])
    return part.getvalue()


class SeriesTemplate:
    """Part 10 bytes of a CT series' instances from one template instance.

    The template's elements are encoded once (with pydicom); :meth:`encode` splices in the
    per-instance elements. The result equals :func:`~ctcurate.demo.dicomwrite.encode` of
    the instance dataset :func:`~ctcurate.demo.dicomwrite.ct_series` builds.
    """

    def __init__(self, template: Dataset) -> None:
        meta = template.file_meta
        write_file_meta_info(DicomBytesIO(), meta, enforce_standard=True)  # completes meta
        before: list[bytes] = []
        after: list[bytes] = []
        for tag in sorted(meta._dict):
            if tag == 0x00020000:
                continue
            if tag == 0x00020003:
                before, after = after, []
                continue
            after.append(_encoded(tag, meta))
        self._meta_before = b"".join(before)
        self._meta_after = b"".join(after)
        self._parts: list[bytes | int] = []
        chunk: list[bytes] = []
        for tag in sorted(template._dict):
            if tag in _VARIABLE:
                self._parts.extend([b"".join(chunk), tag])
                chunk = []
            else:
                chunk.append(_encoded(tag, template))
        self._parts.append(b"".join(chunk))
        missing = set(_VARIABLE) - {p for p in self._parts if isinstance(p, int)}
        if missing:
            msg = f"template lacks per-instance tags {sorted(f'{t:08X}' for t in missing)}"
            raise ValueError(msg)

    def encode(self, sop_uid: str, number: int, position: list[str], pixels: bytes) -> bytes:
        """The file bytes of one instance."""
        sop = sop_uid.encode("ascii")
        body = self._meta_before + _element(0x00020003, "UI", sop) + self._meta_after
        values = {
            _SOP_UID: _element(_SOP_UID, "UI", sop),
            _INSTANCE_NUMBER: _element(_INSTANCE_NUMBER, "IS", str(number).encode("ascii")),
            _POSITION: _element(_POSITION, "DS", "\\".join(position).encode("ascii")),
            _SLICE_LOCATION: _element(_SLICE_LOCATION, "DS", position[2].encode("ascii")),
            _PIXEL_DATA: _element(_PIXEL_DATA, "OW", pixels),
        }
        out = [b"\x00" * 128, b"DICM", _element(0x00020000, "UL", struct.pack("<I", len(body)))]
        out.append(body)
        out.extend(p if isinstance(p, bytes) else values[p] for p in self._parts)
        return b"".join(out)


# -- plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Counts:
    thin: int
    thick: int


def _chest_counts(body: Body, thickness: float, thick: bool) -> _Counts:
    top, bottom = scan_range(body)
    n_thin = np.arange(top, bottom - 1e-6, -thickness).size
    n_thick = np.arange(top - THICK_MM / 2, bottom, -THICK_MM).size if thick else 0
    return _Counts(n_thin, n_thick)


def _study_instances(study: Study) -> int:
    if study.kind == "chest":
        counts = _chest_counts(study.body, study.thickness, study.thick)
        return 2 + counts.thin + counts.thick  # + localizer and dose report
    return {"head": HEAD_SLICES, "abdomen": ABDOMEN_SLICES, "mr": MR_SLICES, "cr": 1}[study.kind]


def _random_date(rng: np.random.Generator) -> dt.date:
    return FIRST_DATE + dt.timedelta(days=int(rng.integers(0, (LAST_DATE - FIRST_DATE).days + 1)))


def plan_header_heavy(n_instances: int, seed: int) -> list[Study]:
    """Studies holding at least ``n_instances`` instances in all (pure; sorted by index).

    Chest CT studies rotate over the sites; one in :data:`EXTRA_EVERY` is followed by a
    head CT, abdomen CT, MR or CR study of the same patient; one in :data:`TRAP_EVERY`
    carries the next of the chest traps (in a seeded order). Lesion fields stay empty.
    """
    if n_instances < 1:
        msg = f"header-heavy archive needs at least one instance, got {n_instances}"
        raise ValueError(msg)
    rng = np.random.default_rng([seed, 7])
    trap_order = [list(CHEST_TRAPS)[i] for i in rng.permutation(len(CHEST_TRAPS))]
    studies: list[Study] = []
    total = n_chest = patient = 0
    while total < n_instances:
        site = SITES[n_chest % len(SITES)]
        body = sample_body(rng)
        date = _random_date(rng)
        traps: tuple[str, ...] = ()
        if n_chest % TRAP_EVERY == 0:
            traps = (trap_order[(n_chest // TRAP_EVERY) % len(trap_order)],)
        spec_p = np.asarray(site.thin_p)
        study = Study(
            index=len(studies),
            patient_index=patient,
            patient_id=patient_pseudonym(seed, patient),
            site=site.code,
            kind="chest",
            study_uid=uid(seed, "hh-study", len(studies)),
            study_date=date,
            era=era_of(date, PANDEMIC_START),
            pattern=None,
            pneumonia=False,
            covid=False,
            severity=0.0,
            border=False,
            thickness=float(site.thin_mm[int(rng.choice(spec_p.size, p=spec_p))]),
            fov=float(np.clip(2.2 * body.half_width + rng.uniform(0, 40), 300, 400)),
            thick=bool(rng.random() < 0.75 or any(CHEST_TRAPS[t] for t in traps)),
            seed=int(rng.integers(0, 2**31 - 1)),
            body=body,
            traps=traps,
        )
        studies.append(study)
        total += _study_instances(study)
        n_chest += 1
        if n_chest % EXTRA_EVERY == 0 and total < n_instances:
            kind = _EXTRA_KINDS[(n_chest // EXTRA_EVERY - 1) % len(_EXTRA_KINDS)]
            date = _random_date(rng)
            extra_traps = {"head": ("phi_institution",), "cr": ("phi_patient_name",)}
            first_of_kind = not any(s.kind == kind for s in studies)
            extra = replace(
                study,
                index=len(studies),
                kind=kind,
                study_uid=uid(seed, "hh-study", len(studies)),
                study_date=date,
                era=era_of(date, PANDEMIC_START),
                thickness=5.0,
                fov=240.0 if kind in ("head", "mr") else 360.0,
                thick=False,
                seed=int(rng.integers(0, 2**31 - 1)),
                traps=extra_traps.get(kind, ()) if first_of_kind else (),
            )
            studies.append(extra)
            total += _study_instances(extra)
        patient += 1
    return studies


# -- pixels -----------------------------------------------------------------------------------


def _outline(rng: np.random.Generator, kind: str, n: int, matrix: int) -> np.ndarray:
    """A coarse (n, matrix, matrix) HU volume: body with two lungs, or a head."""
    c = (np.arange(matrix) - (matrix - 1) / 2.0) / (matrix / 2.0)
    y, x = c[:, None], c[None, :]
    image = np.full((matrix, matrix), -1000.0, np.float32)
    if kind == "head":
        r = np.hypot(x / 0.6, y / 0.75)
        image[r < 1.0] = 1000.0
        image[r < 0.9] = 35.0
    else:
        image[np.hypot(x / 0.9, y / 0.65) < 1.0] = 40.0
        if kind == "chest":
            lungs = np.hypot((np.abs(x) - 0.38) / 0.3, y / 0.45) < 1.0
            image[lungs] = -850.0
    noise = rng.normal(0.0, 15.0, (n, matrix, matrix)).astype(np.float32)
    return np.asarray(image[None] + noise, dtype=np.float32)


# -- writing ----------------------------------------------------------------------------------


class _HeaderHeavyWriter(ArchiveWriter):
    """Writes header-heavy studies with the demo writer's layouts, traps and truth rows."""

    def write_hh_study(self, study: Study) -> None:
        rng = np.random.default_rng(study.seed)
        site = SITE_BY_CODE[study.site]
        if study.kind == "chest":
            self._hh_chest(study, site, rng)
        else:
            self._hh_other(study, site, rng)

    def _ct(
        self,
        study: Study,
        site: Site,
        info: SeriesInfo,
        hu: np.ndarray,
        z: np.ndarray,
        thickness: float,
        offset: float,
        syntax: str = "explicit",
    ) -> tuple[list[str], list[bytes]]:
        """SOP UIDs and file bytes of a CT series (template fast path when uncompressed)."""
        matrix = int(hu.shape[2])
        pixel = study.fov / matrix
        sops = [uid(self.seed, "sop", info.series_uid, i) for i in range(z.size)]
        if syntax != "explicit":
            datasets = ct_series(study, site, info, hu, z, pixel, thickness, sops, offset)
            return sops, [encode(ds, syntax) for ds in datasets]
        # two slices: the template then carries the series-level spacing a vendor writes
        template = SeriesTemplate(
            ct_series(study, site, info, hu[:2], z[:2], pixel, thickness, sops[:2], offset)[0]
        )
        intercept = site.vendor.rescale_intercept
        stored = np.clip(np.rint(hu) - intercept, -32768, 32767).astype(np.int16)
        half = f"{-(matrix - 1) / 2.0 * pixel:.3f}"
        blobs = [
            template.encode(
                sop,
                k + 1,
                [half, half, f"{round(float(z[k]) + offset, 3):.3f}"],
                stored[k].tobytes(),
            )
            for k, sop in enumerate(sops)
        ]
        return sops, blobs

    def _put(
        self,
        study: Study,
        site: Site,
        info: SeriesInfo,
        sops: list[str],
        blobs: list[bytes],
        names: list[str] | None = None,
    ) -> list[str]:
        if names is None:
            names = self.names_for(site, study, info.series_uid, info.number, sops)
        mtime = study_mtime(study.study_date)
        for name, blob in zip(names, blobs, strict=True):
            self.write_file(name, blob, mtime)
        return names

    def _hh_chest(self, study: Study, site: Site, rng: np.random.Generator) -> None:
        vendor = site.vendor
        top, bottom = scan_range(study.body)
        z = np.arange(top, bottom - 1e-6, -study.thickness)
        offset = -round(float(rng.uniform(40.0, 220.0)), 1)
        sn_loc, sn_thin, sn_thick, sn_dose = vendor.series_numbers
        syntax = next((_THIN_SYNTAX[t] for t in study.traps if t in _THIN_SYNTAX), "explicit")
        # the JPEG 2000 encoder needs images of 32 pixels or more
        hu = _outline(rng, "chest", z.size, 2 * HH_MATRIX if syntax == "jpeg2000" else HH_MATRIX)

        loc = self.series_info(
            study, "localizer", sn_loc, vendor.localizer, vendor.soft_kernel,
            "ORIGINAL\\PRIMARY\\LOCALIZER",
        )  # fmt: skip
        ds = localizer(study, site, loc, hu, uid(self.seed, "sop", loc.series_uid, 0), top + offset)
        names = self._put(study, site, loc, [str(ds.SOPInstanceUID)], encode_series([ds]))
        self.add_truth(
            study, loc.series_uid, "localizer", quarantine="phi_present" if loc.leak else None
        )
        if loc.leak:
            self.trap_files.append((names[0], loc.leak, "phi_present", loc.series_uid))

        thin = self.series_info(
            study, "thin", sn_thin, vendor.thin_description(study.thickness),
            vendor.lung_kernel, "ORIGINAL\\PRIMARY\\AXIAL",
        )  # fmt: skip
        sops, blobs = self._ct(study, site, thin, hu, z, study.thickness, offset, syntax)
        if "duplicate_slice" in study.traps:
            j = min(z.size - 1, z.size // 2 + 3)
            dup_sop = uid(self.seed, "sop-dup", thin.series_uid)
            dup = ct_series(
                study, site, thin, hu[j : j + 1], z[j : j + 1], study.fov / hu.shape[2],
                study.thickness, [dup_sop], offset,
            )[0]  # fmt: skip
            dup.InstanceNumber = z.size + 1
            sops, blobs = [*sops, dup_sop], [*blobs, encode_series([dup])[0]]
        all_names = self.names_for(site, study, thin.series_uid, thin.number, sops)
        keep = list(range(len(sops)))
        if "missing_slice" in study.traps:
            gone = z.size // 2
            keep.remove(gone)
            self.trap_files.append((all_names[gone], "missing_slice", None, thin.series_uid))
        names = [all_names[i] for i in keep]
        sops, blobs = [sops[i] for i in keep], [blobs[i] for i in keep]
        if "shuffled_names" in study.traps:
            names = [names[i] for i in rng.permutation(len(names))]
            self.trap_files.extend((n, "shuffled_names", None, thin.series_uid) for n in names)
        if syntax != "explicit":
            trap = f"{syntax}_lossless"
            self.trap_files.extend((n, trap, None, thin.series_uid) for n in names)
        self._put(study, site, thin, sops, blobs, names)
        self.add_truth(study, thin.series_uid, "chest_ct")
        if "duplicate_slice" in study.traps:
            self.trap_files.append((all_names[-1], "duplicate_slice", None, thin.series_uid))
        if "duplicate_site" in study.traps:
            self.copy_to_other_site(study, thin.series_uid, thin.number, sops, blobs)

        if study.thick:
            thick = self.series_info(
                study, "thick", sn_thick, vendor.thick_description(), vendor.soft_kernel,
                "ORIGINAL\\PRIMARY\\AXIAL",
            )  # fmt: skip
            z_thick = np.arange(top - THICK_MM / 2, bottom, -THICK_MM)
            vol = _outline(rng, "chest", z_thick.size, HH_MATRIX)
            syntax = "jpegls" if "jpegls_lossless" in study.traps else "explicit"
            sops, blobs = self._ct(study, site, thick, vol, z_thick, THICK_MM, offset, syntax)
            names = self._put(study, site, thick, sops, blobs)
            if syntax != "explicit":
                self.trap_files.extend(
                    (n, "jpegls_lossless", None, thick.series_uid) for n in names
                )
            self.add_truth(study, thick.series_uid, "chest_ct_soft")
            if "truncated" in study.traps:
                self.truncate(study, names, blobs, thick.series_uid)

        dose = self.series_info(
            study, "dose", sn_dose, vendor.dose, "", "DERIVED\\SECONDARY\\SCREEN SAVE"
        )
        ds = dose_report(
            study, site, dose, 2 * HH_MATRIX, uid(self.seed, "sop", dose.series_uid, 0)
        )
        self._put(study, site, dose, [str(ds.SOPInstanceUID)], encode_series([ds]))
        self.add_truth(study, dose.series_uid, "dose_report")

    def _hh_other(self, study: Study, site: Site, rng: np.random.Generator) -> None:
        vendor = site.vendor
        kind = {"head": "head_ct", "abdomen": "abdomen_ct", "mr": "mr", "cr": "cr"}[study.kind]
        if study.kind in ("head", "abdomen"):
            n = HEAD_SLICES if study.kind == "head" else ABDOMEN_SLICES
            desc = "Head 5mm" if study.kind == "head" else "Abdomen 5mm"
            info = self.series_info(
                study, kind, 2 if study.kind == "head" else 3, desc, vendor.soft_kernel,
                "ORIGINAL\\PRIMARY\\AXIAL",
            )  # fmt: skip
            top = 0.0 if study.kind == "head" else -study.body.lung_height - 10.0
            z = top - 5.0 * np.arange(n)
            hu = _outline(rng, study.kind, n, HH_MATRIX)
            offset = 0.0 if study.kind == "head" else -300.0
            sops, blobs = self._ct(study, site, info, hu, z, 5.0, offset)
        elif study.kind == "mr":
            info = self.series_info(study, kind, 5, "T1 SE AX", "", "ORIGINAL\\PRIMARY\\M\\ND")
            signal = np.clip(_outline(rng, "head", MR_SLICES, HH_MATRIX) + 1000.0, 0, 4095)
            sops = [uid(self.seed, "sop", info.series_uid, i) for i in range(MR_SLICES)]
            blobs = encode_series(mr_series(study, site, info, signal.astype(np.uint16), sops))
        else:
            info = self.series_info(study, kind, 1, "Chest PA", "", "ORIGINAL\\PRIMARY")
            image = np.clip(_outline(rng, "chest", 1, 2 * HH_MATRIX)[0] + 1000.0, 0, 4095)
            sops = [uid(self.seed, "sop", info.series_uid, 0)]
            blobs = encode_series([cr_image(study, site, info, image.astype(np.uint16), sops[0])])
        names = self._put(study, site, info, sops, blobs)
        self.add_truth(
            study, info.series_uid, kind, quarantine="phi_present" if info.leak else None
        )
        if info.leak:
            self.trap_files.extend((n, info.leak, "phi_present", info.series_uid) for n in names)


def write_header_heavy(out: Path, n_instances: int, seed: int) -> None:
    """Write a header-heavy archive of at least ``n_instances`` DICOM instances into ``out``.

    ``out`` receives ``archive/<site>/`` (same sites, vendors, layouts and trap kinds as the
    demo archive, :data:`HH_MATRIX`-pixel images), ``truth.parquet`` and
    ``truth_files.parquet``; it is published atomically and its bytes and file times depend
    only on ``n_instances`` and ``seed``.

    Raises
    ------
    ValueError
        When ``n_instances`` is below 1.
    """
    log = get_logger("synth")
    studies = plan_header_heavy(n_instances, seed)
    with (
        guarded_output(Path(out), "synth", own=OWN_FILES),
        marked_dir(Path(out), "synth", fsync_each_file=False) as tmp,
    ):
        writer = _HeaderHeavyWriter(root=tmp, seed=seed, matrix=HH_MATRIX)
        for study in progress(studies, len(studies), "synth header-heavy", log, unit="studies"):
            writer.write_hh_study(study)
        writer.write_non_dicom()
        write_parquet(tmp / "truth.parquet", truth_table(writer.truth))
        write_parquet(tmp / "truth_files.parquet", truth_files_table(writer.trap_files))
        for path in (tmp / "truth.parquet", tmp / "truth_files.parquet"):
            os.utime(path, (OUTPUT_MTIME, OUTPUT_MTIME))
        pin_mtimes(tmp, OUTPUT_MTIME)
        log.info(
            "wrote %d files, %d series, %d studies, %d trap files",
            writer.n_files,
            len(writer.truth),
            len(studies),
            len(writer.trap_files),
        )
