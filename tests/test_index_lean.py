"""The lean header reader gives pydicom's row on every file it takes, and gives up otherwise."""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from helpers.index import ct_slice, save
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from ctcurate.demo.headerheavy import write_header_heavy
from ctcurate.dicom import checks, lean
from ctcurate.dicom import header as dicom
from ctcurate.pipeline.snapshot import list_archive


def outcomes(root: Path) -> tuple[int, int]:
    """Compare both paths on every file under ``root``: (files, files read lean)."""
    listing = list_archive(root).to_pylist()
    n_lean = 0
    for row in listing:
        path, size, mtime = row["path"], row["size"], row["mtime_ns"]
        fast = dicom.read_instance(root, path, size, mtime, 2**30)
        reference = dicom.read_instance(root, path, size, mtime, 2**30, lean=False)
        assert fast == reference, path
        n_lean += took_lean(root / path, path, size, mtime)
    return len(listing), n_lean


def took_lean(full: Path, path: str, size: int, mtime: int) -> bool:
    with full.open("rb") as fp:
        head = fp.read(1 << 16)
        return lean.read_lean(fp, head, path, size, mtime, full.stat().st_size, []) is not None


def test_header_heavy_archive_reads_lean_with_pydicom_values(tmp_path: Path) -> None:
    write_header_heavy(tmp_path / "hh", 400, seed=7)
    n, n_lean = outcomes(tmp_path / "hh" / "archive")
    assert n >= 400
    assert n_lean >= 0.9 * n  # everything but the traps and non-DICOM files


def test_pydicom_test_files_give_the_same_outcome(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    files = [Path(f) for f in pydicom.data.get_testdata_files() if Path(f).is_file()]
    for i, src in enumerate(files):
        (root / "S").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "S" / f"{i:03d}_{src.name}")
    n, n_lean = outcomes(root)
    assert n == len(files) > 100
    assert n_lean >= 1


def implicit(ds: Dataset) -> bytes:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def with_item(**attrs: Any) -> Dataset:
    item = Dataset()
    for key, value in attrs.items():
        setattr(item, key, value)
    ds = ct_slice(0)
    ds.RequestAttributesSequence = [item]
    return ds


def multiframe() -> Dataset:
    ds = ct_slice(0, NumberOfFrames=2)
    ds.PixelData = ds.PixelData * 2
    return ds


def rle() -> Dataset:
    ds = ct_slice(0)
    ds.compress(RLELossless)
    return ds


@pytest.mark.parametrize(
    ("name", "make", "expect_lean"),
    [
        ("explicit", lambda: ct_slice(0), True),
        ("rle", rle, True),
        ("empty_phi_in_sequence", lambda: with_item(InstitutionName=""), True),
        ("phi_in_sequence", lambda: with_item(InstitutionName="General Hospital"), False),
        ("phi_top", lambda: ct_slice(0, PatientName="Doe^Jane"), False),
        ("empty_phi_name", lambda: ct_slice(0, PatientName="^"), True),
        ("multi_valued_ds", lambda: ct_slice(0, SliceThickness="2.5\\3"), True),
        ("one_spacing", lambda: ct_slice(0, PixelSpacing="0.7"), True),
        ("nan_ds", lambda: ct_slice(0, SliceThickness="nan"), False),
        ("huge_ds", lambda: ct_slice(0, SliceThickness="1e999"), True),
        ("non_ascii", lambda: ct_slice(0, SeriesDescription="Thorax ärztlich"), False),
        ("latin1", lambda: ct_slice(0, SpecificCharacterSet="ISO_IR 100"), True),
        ("japanese", lambda: ct_slice(0, SpecificCharacterSet="ISO 2022 IR 87"), False),
        ("no_pixels", lambda: ct_slice(0, PixelData=b""), False),
        ("uid_leading_space", lambda: ct_slice(0, SOPInstanceUID=" 1.2.3.4"), True),
        ("uid_too_long", lambda: ct_slice(0, SOPInstanceUID="1." + "2" * 70), False),
        ("uid_letters", lambda: ct_slice(0, SOPInstanceUID="1.2.a"), False),
        ("position_two", lambda: ct_slice(0, ImagePositionPatient="1\\2"), True),
        ("position_huge", lambda: ct_slice(0, ImagePositionPatient="1e999\\0\\0"), True),
        ("position_spaced", lambda: ct_slice(0, ImagePositionPatient=" +1 \\.5\\-2e1"), True),
        ("number_huge", lambda: ct_slice(0, InstanceNumber="12345678901234567"), True),
        ("number_signed", lambda: ct_slice(0, InstanceNumber="+5"), True),
        ("number_two", lambda: ct_slice(0, InstanceNumber="1\\2"), True),
        ("number_empty", lambda: ct_slice(0, InstanceNumber=""), True),
        ("modality_two", lambda: ct_slice(0, Modality="CT\\MR"), False),
        ("modality_empty", lambda: ct_slice(0, Modality=""), False),
        ("date_short", lambda: ct_slice(0, StudyDate="2020011"), True),
        ("date_bad_month", lambda: ct_slice(0, StudyDate="20201301"), True),
        ("series_uid_bad", lambda: ct_slice(0, SeriesInstanceUID="1..2"), False),
        ("study_uid_bad", lambda: ct_slice(0, StudyInstanceUID="1..2"), True),
        ("multiframe", multiframe, True),
        ("charset_two", lambda: ct_slice(0, SpecificCharacterSet=["", "ISO 2022 IR 87"]), False),
        ("dicomdir_class", lambda: ct_slice(0, SOPClassUID="1.2.840.10008.1.3.10"), False),
    ],
)
def test_lean_reads_or_gives_up_with_the_same_outcome(
    tmp_path: Path, name: str, make: Any, expect_lean: bool
) -> None:
    with warnings.catch_warnings():  # pydicom warns when a test sets an invalid value
        warnings.simplefilter("ignore")
        data = save(make(), tmp_path / "H01" / f"{name}.dcm")
    path = f"H01/{name}.dcm"
    fast = dicom.read_instance(tmp_path, path, len(data), 0, 2**30)
    assert fast == dicom.read_instance(tmp_path, path, len(data), 0, 2**30, lean=False)
    assert took_lean(tmp_path / path, path, len(data), 0) is expect_lean


def test_implicit_vr_and_cut_files(tmp_path: Path) -> None:
    data = implicit(ct_slice(0))
    (tmp_path / "H01").mkdir()
    cases = {
        "implicit.dcm": (data, True),
        "cut_pixels.dcm": (data[:-10], False),
        "cut_header.dcm": (data[:300], False),
    }
    for name, (content, expect_lean) in cases.items():
        (tmp_path / "H01" / name).write_bytes(content)
        path = f"H01/{name}"
        fast = dicom.read_instance(tmp_path, path, len(content), 0, 2**30)
        assert fast == dicom.read_instance(tmp_path, path, len(content), 0, 2**30, lean=False)
        assert took_lean(tmp_path / path, path, len(content), 0) is expect_lean, name
    row = dicom.read_instance(tmp_path, "H01/implicit.dcm", len(data), 0, 2**30).record
    assert row is not None
    assert row["transfer_syntax_uid"] == ImplicitVRLittleEndian


def test_no_meta_file_is_left_to_pydicom(tmp_path: Path) -> None:
    ds = ct_slice(0)
    ds.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    (tmp_path / "f.dcm").write_bytes(buf.getvalue())
    st = (tmp_path / "f.dcm").stat()
    assert not took_lean(tmp_path / "f.dcm", "f.dcm", st.st_size, st.st_mtime_ns)
    out = dicom.read_instance(tmp_path, "f.dcm", st.st_size, st.st_mtime_ns, 2**30)
    assert out.record is not None
    assert out.record["flags"] == ["no_meta", "no_site"]


def test_lean_header_answers_only_needed_keywords() -> None:
    header = lean.LeanHeader({}, lean.LeanMeta(None))
    assert header.get("Rows") is None
    assert "Rows" not in header
    with pytest.raises(KeyError, match="PatientName is not read by the lean reader"):
        header.get("PatientName")
    assert lean.convert("DS", b"1\\2.5 ") == [1.0, 2.5]
    assert lean.convert("IS", b" 12") == 12
    assert lean.convert("UI", ExplicitVRLittleEndian.encode() + b"\x00") == ExplicitVRLittleEndian


# --- the per-file fast paths against the reference conversion ------------------------------

NUMERIC = st.text(alphabet=" 0123456789.+-eE\\\x00a", max_size=24).map(str.encode)
TEXTS = st.one_of(
    NUMERIC, st.text(alphabet=" ABC12.\\^\x00\x7f", max_size=12).map(str.encode), st.binary()
)


def give_up_or(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except lean._GiveUp:
        return "give up"


@given(raw=st.one_of(st.none(), NUMERIC))
@settings(max_examples=300, deadline=None)
def test_fast_columns_give_the_reference_values(raw: bytes | None) -> None:
    def reference(kind: str, keyword: str) -> Any:
        return give_up_or(lean.column_reference, kind, keyword, raw)

    assert give_up_or(lean.image_position, raw) == reference("floats3", "ImagePositionPatient")
    number = reference("int", "InstanceNumber")
    assert give_up_or(lean.instance_number, raw) == (number if number == "give up" else number[0])
    uid = give_up_or(lean.sop_instance_uid, raw)
    if uid != "give up":  # the fast path may give up more often, never differ
        assert reference("core", "SOPInstanceUID") == (uid, ())


BASE = {
    "SOPInstanceUID": b"1.2.3.4",
    "SeriesInstanceUID": b"1.2.3.5",
    "Modality": b"CT",
    "Rows": b"\x08\x00",
    "Columns": b"\x08\x00",
    "BitsAllocated": b"\x10\x00",
    "SOPClassUID": b"1.2.840.10008.5.1.4.1.1.2\x00",
    "StudyInstanceUID": b"1.2.3.6 ",
    "PatientID": b"P1",
    "StudyDate": b"20200315",
    "ImageType": b"ORIGINAL\\PRIMARY",
    "SliceThickness": b"2.5 ",
    "PixelSpacing": b"0.7\\0.8 ",
    "ImagePositionPatient": b"-1\\2.5\\3e1 ",
    "ImageOrientationPatient": b"1\\0\\0\\0\\1\\0 ",
    "InstanceNumber": b"7 ",
    "RescaleSlope": b"1",
    "NumberOfFrames": b"1 ",
    "SpecificCharacterSet": b"ISO_IR 100",
}


@given(
    values=st.dictionaries(st.sampled_from(sorted(BASE)), st.one_of(st.none(), TEXTS), max_size=3)
)
@settings(max_examples=300, deadline=None)
def test_lean_record_is_the_record_builder_on_lean_values(
    values: dict[str, bytes | None],
) -> None:
    raws = {k: v for k, v in (BASE | values).items() if v is not None}
    fast = give_up_or(
        lean.lean_record,
        {lean._T[k]: v for k, v in raws.items()},
        None,
        "H01/a.dcm",
        10,
        20,
        ExplicitVRLittleEndian,
        ["changed_since_snapshot"],
    )
    if fast == "give up":
        return
    header = lean.LeanHeader(
        {
            lean._BY_KEYWORD[k]: lean.convert(lean._NEEDED[lean._BY_KEYWORD[k]][1], v)
            for k, v in raws.items()
        },
        lean.LeanMeta(None),
    )
    reference = dicom.instance_record(
        header, "H01/a.dcm", 10, 20, ExplicitVRLittleEndian, ["changed_since_snapshot"]
    )
    assert fast[0] == reference


def test_real_tcia_files_read_lean_with_pydicom_values(tmp_path: Path) -> None:
    """Real Philips (implicit VR) and Siemens files, their identifying elements emptied,
    plain and gzip-compressed: both paths agree, the lean one reads every plain file and
    the region headers (skipped where ../shared/realct is absent)."""
    import gzip

    from helpers.realdata import TCIA

    files = sorted(TCIA.rglob("*.dcm"))[::12]
    if not files:
        pytest.skip("../shared/realct is absent")
    root = tmp_path / "archive"
    (root / "S").mkdir(parents=True)

    def blank(_: Any, elem: Any) -> None:
        if elem.keyword in checks.PHI_KEYWORDS:
            elem.value = [] if elem.VR == "SQ" else ""

    for i, src in enumerate(files):
        ds = pydicom.dcmread(src)
        ds.walk(blank)
        ds.save_as(root / "S" / f"{i:03d}.dcm")
        data = (root / "S" / f"{i:03d}.dcm").read_bytes()
        (root / "S" / f"{i:03d}.dcm.gz").write_bytes(gzip.compress(data))
    n, n_lean = outcomes(root)
    assert (n, n_lean) == (2 * len(files), len(files))
    studies = set()
    for i in range(len(files)):
        path = root / "S" / f"{i:03d}.dcm.gz"
        st = path.stat()
        out = dicom.read_instance(root, f"S/{path.name}", st.st_size, st.st_mtime_ns, 2**30)
        assert out.status == "indexed"
        studies.add((out.record["study_description"], out.record["protocol_name"]))
    assert studies == {
        ("Chest", "2 Chest C-/Thorax"),
        ("Thorax^AThoraxRoutine (Adult)", "AThoraxRoutine"),
    }


@pytest.mark.parametrize(
    ("charset", "words"),
    [
        ("ISO_IR 192", {"StudyDescription": "胸部CT", "ProtocolName": "肺野条件"}),
        ("ISO_IR 100", {"StudyDescription": "Tórax", "RequestedProcedureDescription": "TC tórax"}),
        ("", {"StudyDescription": "CT CHEST", "ProtocolName": "2 Chest C-/Thorax"}),
    ],
)
def test_region_headers_read_alike_in_other_character_sets(
    tmp_path: Path, charset: str, words: dict[str, str]
) -> None:
    ds = ct_slice(0, BodyPartExamined="", **words)
    if charset:
        ds.SpecificCharacterSet = charset
    save(ds, tmp_path / "S" / "a.dcm")
    st = (tmp_path / "S" / "a.dcm").stat()
    fast = dicom.read_instance(tmp_path, "S/a.dcm", st.st_size, st.st_mtime_ns, 2**30)
    slow = dicom.read_instance(tmp_path, "S/a.dcm", st.st_size, st.st_mtime_ns, 2**30, lean=False)
    assert fast == slow
    assert fast.record is not None
    columns = {
        "StudyDescription": "study_description",
        "ProtocolName": "protocol_name",
        "RequestedProcedureDescription": "requested_procedure_description",
    }
    assert {k: fast.record[columns[k]] for k in words} == words
    assert fast.record["body_part_examined"] is None


@pytest.mark.parametrize(
    ("meanings", "expected", "lean_reads"),
    [
        (["Chest"], "Chest", False),  # a coded region: the pydicom path reads it
        (["Thorax", "Abdomen"], "Thorax\\Abdomen", False),
        ([], None, True),  # an empty sequence: the lean path takes the file
    ],
)
def test_anatomic_region_sequence_reads_alike(
    tmp_path: Path, meanings: list[str], expected: str | None, lean_reads: bool
) -> None:
    ds = ct_slice(0)
    items = []
    for meaning in meanings:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "SCT", meaning
        items.append(item)
    ds.AnatomicRegionSequence = items
    for name, data in (("e.dcm", None), ("i.dcm", implicit(ds))):
        path = tmp_path / "S" / name
        if data is None:
            save(ds, path)
        else:
            path.write_bytes(data)
        st = path.stat()
        fast = dicom.read_instance(tmp_path, f"S/{name}", st.st_size, st.st_mtime_ns, 2**30)
        slow = dicom.read_instance(
            tmp_path, f"S/{name}", st.st_size, st.st_mtime_ns, 2**30, lean=False
        )
        assert fast == slow
        assert fast.record is not None
        assert fast.record["anatomic_region"] == expected
        assert took_lean(path, f"S/{name}", st.st_size, st.st_mtime_ns) is lean_reads
