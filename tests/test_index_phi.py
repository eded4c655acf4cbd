"""The PHI policy of index: pseudonyms and dummies pass and are counted, real names do not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.index import ct_slice, run_index, save, table
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from ctcurate.catalog import build
from ctcurate.dicom import header as dicom
from ctcurate.dicom import lean, phi
from ctcurate.errors import ParamsError
from ctcurate.params import IndexParams, PhiPolicy, load_section
from ctcurate.pipeline import query


def rules(**policy: Any) -> phi.Rules:
    return PhiPolicy(**policy).compiled().default


@pytest.mark.parametrize(
    ("element", "values", "policy", "rule"),
    [
        ("PatientName", ["Lung_Dx-A0001"], {}, "pseudonym"),  # = PatientID
        ("PatientName", ["Lung_Dx-A0001^^^"], {}, "pseudonym"),  # empty components
        ("PatientName", ["DOE^JOHN"], {}, "phi"),
        ("PatientName", ["P123"], {"strict": True}, "phi"),
        ("PatientName", ["anonymous"], {}, "dummy"),
        ("PatientName", ["----"], {}, "dummy"),  # no letter or digit
        ("PatientName", ["SITE7-0042"], {"pseudonym_patterns": [r"SITE7-[0-9]{4}"]}, "pseudonym"),
        ("PatientName", ["SITE7-0042 DOE"], {"pseudonym_patterns": [r"SITE7-[0-9]{4}"]}, "phi"),
        ("PatientName", ["^^", " "], {}, "empty"),
        # a code: every word holds a digit (or is a dummy); no name is written so
        ("PatientName", ["Anonymized1"], {}, "pseudonym"),
        ("PatientName", ["ANON^0001"], {}, "pseudonym"),
        ("PatientName", ["1001^6657^ISPY1"], {}, "pseudonym"),
        ("PatientName", ["9f86d081884c7d65"], {}, "pseudonym"),
        ("PatientName", ["DOE^JOHN^12345"], {}, "phi"),  # a name beside a number
        ("PatientName", ["DOE_JOHN_12345"], {}, "phi"),
        ("PatientName", ["ANONYMOUS^JOHN"], {}, "phi"),
        ("PatientName", ["Patient 12"], {}, "pseudonym"),
        ("PatientName", ["SUBJECT^007"], {}, "pseudonym"),
        ("PatientName", ["Case^Steve"], {}, "phi"),  # a surname that is also a code word
        ("PatientName", ["Patient"], {}, "dummy"),
        ("PatientName", ["Anonymized1"], {"strict": True}, "phi"),
        ("PatientName", ["REMOVED", "DOE^JOHN"], {}, "phi"),  # every value must pass
        ("ReferringPhysicianName", ["Anonymized"], {}, "dummy"),
        ("ReferringPhysicianName", ["Moriarty^James"], {}, "phi"),
        ("OtherPatientNames", ["ANONYMOUS"], {}, "phi"),  # empty action: no dummy either
        ("PatientBirthDate", ["19580317"], {}, "phi"),
        ("PatientBirthDate", ["19580101"], {}, "phi"),
        ("PatientBirthDate", ["19580101"], {"actions": {"PatientBirthDate": "year"}}, "year"),
        ("PatientBirthDate", ["19580317"], {"actions": {"PatientBirthDate": "year"}}, "phi"),
        ("AccessionNumber", ["8000000000330109"], {}, "retain"),
        ("AccessionNumber", ["8000000000330109"], {"strict": True}, "phi"),
        ("InstitutionName", ["ST ELSEWHERE"], {}, "phi"),
        ("InstitutionName", ["Hospital 12 de Octubre"], {}, "phi"),
        # PS3.15 X/Z/D: a hash (neurolabusc/dcm_qa_deident) or a dummy in its place
        ("InstitutionName", ["1177879318455840"], {}, "pseudonym"),
        ("InstitutionName", ["ANONYMIZED"], {}, "dummy"),
        ("InstitutionName", ["1177879318455840"], {"strict": True}, "phi"),
        ("InstitutionName", ["1177879318455840"], {"actions": {"InstitutionName": "empty"}}, "phi"),
        ("InstitutionAddress", ["1161 21st Ave South"], {}, "phi"),
        ("OtherPatientNames", ["ANON1"], {}, "phi"),  # empty action: no code either
        ("InstitutionName", ["ST ELSEWHERE"], {"actions": {"InstitutionName": "retain"}}, "retain"),
        ("OtherPatientIDsSequence", None, {}, "phi"),  # a non-empty sequence
    ],
)
def test_policy_judges_each_value(
    element: str, values: list[str] | None, policy: dict[str, Any], rule: str
) -> None:
    patient_id = "P123" if element == "PatientName" and values == ["P123"] else "Lung_Dx-A0001"
    assert rules(**policy).judge(element, values, patient_id) == rule


def test_site_overrides_change_only_their_site() -> None:
    policy = PhiPolicy(
        sites={"H02": {"actions": {"InstitutionName": "retain"}}, "H03": {"strict": True}}
    ).compiled()
    assert policy.rules_for("H02").judge("InstitutionName", ["X"], None) == "retain"
    assert policy.rules_for("H02").judge("PatientName", ["P1"], "P1") == "pseudonym"
    assert policy.rules_for("H03").judge("PatientName", ["P1"], "P1") == "phi"
    assert policy.rules_for("H01").judge("InstitutionName", ["X"], None) == "phi"
    assert policy.rules_for(None).judge("PatientName", ["P1"], "P1") == "pseudonym"
    strict = PhiPolicy(strict=True, actions={"InstitutionName": "retain"}).compiled()
    assert strict.default.judge("InstitutionName", ["X"], None) == "phi"  # strict wins


@pytest.mark.parametrize(
    ("section", "msg"),
    [
        ({"phi": {"actions": {"PatientBirthDate": "pseudonym"}}}, "not one of empty, retain"),
        ({"phi": {"actions": {"OtherPatientIDsSequence": "year"}}}, "not one of empty, retain"),
        ({"phi": {"actions": {"PatientNam": "retain"}}}, "PatientNam"),
        ({"phi": {"sites": {"H1": {"strictly": True}}}}, "strictly"),
        ({"phi": {"pseudonym_patterns": ["(unclosed"]}}, "not a regular expression"),
    ],
)
def test_bad_policy_is_a_params_error(tmp_path: Path, section: dict[str, Any], msg: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"index": section}))
    with pytest.raises(ParamsError, match=msg):
        load_section(path, "index", IndexParams)


# --- files --------------------------------------------------------------------------------------


def both_paths(root: Path, rel: str, policy: phi.Policy = phi.DEFAULT_POLICY) -> dicom.FileOutcome:
    """The outcome of ``rel``, the lean and the pydicom path agreeing."""
    size = (root / rel).stat().st_size
    fast = dicom.read_instance(root, rel, size, 0, 2**30, policy=policy)
    slow = dicom.read_instance(root, rel, size, 0, 2**30, lean=False, policy=policy)
    assert fast == slow
    return fast


def took_lean(root: Path, rel: str, policy: phi.Policy = phi.DEFAULT_POLICY) -> bool:
    data = (root / rel).read_bytes()
    return lean.read_lean(None, data, rel, len(data), 0, len(data), [], policy) is not None


def deidentified(i: int = 0, **attrs: Any) -> Dataset:
    """A slice as a PS3.15 gateway writes it: PatientName = PatientID, the de-id columns."""
    ds = ct_slice(i, PatientName="PSEUDO01")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Per DICOM PS 3.15 AnnexE"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    codes = []
    for value in ("113100", "113108", "113100"):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = value, "DCM"
        item.CodeMeaning = "Basic Application Confidentiality Profile"
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ""
    ds.AccessionNumber = ""
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("implicit", [False, True])
def test_pseudonymised_file_is_indexed_lean_with_deid_columns(
    tmp_path: Path, implicit: bool
) -> None:
    ds = deidentified()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    save(ds, tmp_path / "H01" / "a.dcm")
    out = both_paths(tmp_path, "H01/a.dcm")
    assert out.status == "indexed"
    assert out.record is not None
    assert out.record["phi_accepted"] == ["PatientName:pseudonym"]
    assert out.record["patient_identity_removed"] == "YES"
    assert out.record["deidentification_method"] == "Per DICOM PS 3.15 AnnexE"
    assert out.record["deidentification_method_codes"] == ["113100", "113108"]
    assert out.record["longitudinal_temporal_information_modified"] == "MODIFIED"
    assert took_lean(tmp_path, "H01/a.dcm")  # no pydicom parse on the fast path


def test_codes_in_place_of_names_are_indexed_and_counted(tmp_path: Path) -> None:
    """A gateway's counter for the name and a hash for the institution (as in the BSD-licensed
    neurolabusc/dcm_qa_deident series) are indexed on the fast path; a real name beside a
    number is not."""
    kept = deidentified(PatientName="Anonymized1", InstitutionName="1177879318455840")
    save(kept, tmp_path / "H01" / "a.dcm")
    out = both_paths(tmp_path, "H01/a.dcm")
    assert out.status == "indexed"
    assert out.record is not None
    assert out.record["phi_accepted"] == ["InstitutionName:pseudonym", "PatientName:pseudonym"]
    assert took_lean(tmp_path, "H01/a.dcm")
    save(deidentified(1, PatientName="DOE^JOHN^12345"), tmp_path / "H01" / "b.dcm")
    out = both_paths(tmp_path, "H01/b.dcm")
    assert (out.status, out.reason, out.detail) == ("quarantined", "phi_present", "PatientName")


def test_real_looking_name_is_quarantined_naming_the_tag(tmp_path: Path) -> None:
    save(ct_slice(0, PatientName="DOE^JOHN", PatientID="P123"), tmp_path / "H01" / "a.dcm")
    out = both_paths(tmp_path, "H01/a.dcm")
    assert (out.status, out.reason, out.detail) == ("quarantined", "phi_present", "PatientName")


def test_identity_removed_yes_is_not_trusted_alone(tmp_path: Path) -> None:
    save(deidentified(PatientBirthDate="19580317"), tmp_path / "H01" / "a.dcm")
    out = both_paths(tmp_path, "H01/a.dcm")
    assert (out.reason, out.detail) == ("phi_present", "PatientBirthDate")


def test_strict_mode_quarantines_a_pseudonym(tmp_path: Path) -> None:
    save(deidentified(), tmp_path / "H01" / "a.dcm")
    out = both_paths(tmp_path, "H01/a.dcm", PhiPolicy(strict=True).compiled())
    assert (out.reason, out.detail) == ("phi_present", "PatientName")


@pytest.mark.parametrize("implicit", [False, True])
def test_nested_values_are_judged_lean_and_named_by_their_path(
    tmp_path: Path, implicit: bool
) -> None:
    ds = deidentified()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    items = [Dataset(), Dataset()]
    items[0].RequestingPhysician = "ANONYMOUS"
    items[0].AccessionNumber = "A1B2C3"
    items[1].RequestingPhysician = "PSEUDO01"  # the PatientID
    inner = Dataset()
    inner.OperatorsName = "----"
    items[1].ReferencedStudySequence = [inner]
    ds.RequestAttributesSequence = items
    save(ds, tmp_path / "H01" / "a.dcm")
    out = both_paths(tmp_path, "H01/a.dcm")
    assert out.record is not None
    assert out.record["phi_accepted"] == [
        "PatientName:pseudonym",
        "RequestAttributesSequence>AccessionNumber:retain",
        "RequestAttributesSequence>ReferencedStudySequence>OperatorsName:dummy",
        "RequestAttributesSequence>RequestingPhysician:dummy",
        "RequestAttributesSequence>RequestingPhysician:pseudonym",
    ]
    assert took_lean(tmp_path, "H01/a.dcm")
    items[1].RequestingPhysician = "KILLEEN^THOMAS"
    save(ds, tmp_path / "H01" / "b.dcm")
    out = both_paths(tmp_path, "H01/b.dcm")
    assert (out.reason, out.detail) == (
        "phi_present",
        "RequestAttributesSequence>RequestingPhysician",
    )
    assert not took_lean(tmp_path, "H01/b.dcm")  # the pydicom path names the tag


def census_archive(root: Path) -> Path:
    """Two sites: H01 pseudonymised, one real name and a retained institution refused; H02
    retains its institution by the policy."""
    archive = root / "archive"
    for i in range(3):
        save(deidentified(i, InstitutionName="H02 GENERAL"), archive / "H02" / f"{i}.dcm")
        save(deidentified(i), archive / "H01" / f"{i}.dcm")
    save(deidentified(3, OperatorsName="ANON"), archive / "H01" / "3.dcm")
    save(ct_slice(4, PatientName="DOE^JOHN", PatientID="P123"), archive / "H01" / "4.dcm")
    save(deidentified(5, InstitutionName="H01 GENERAL"), archive / "H01" / "5.dcm")
    return archive


def test_census_counts_rules_per_site_and_element_without_values(tmp_path: Path) -> None:
    archive = census_archive(tmp_path)
    policy = {"sites": {"H02": {"actions": {"InstitutionName": "retain"}}}}
    report = run_index(archive, tmp_path / "out", phi=policy)
    out = tmp_path / "out"
    assert report["files_indexed"] == 7
    assert report["quarantine_reasons"] == {"phi_present": 2}
    assert report["phi_census"] == {
        "H01": {
            "InstitutionName": {"phi": 1},
            "OperatorsName": {"dummy": 1},
            "PatientName": {"phi": 1, "pseudonym": 4},
        },
        "H02": {"InstitutionName": {"retain": 3}, "PatientName": {"pseudonym": 3}},
    }
    _, rows = query.fetch(out / build.CATALOG_FILE, "SELECT * FROM phi_census WHERE site = 'H01'")
    assert [tuple(r) for r in rows] == [
        ("H01", "InstitutionName", "phi", 1),
        ("H01", "OperatorsName", "dummy", 1),
        ("H01", "PatientName", "phi", 1),
        ("H01", "PatientName", "pseudonym", 4),
    ]
    quarantined = {r["path"]: r["detail"] for r in table(out, "quarantine")}
    assert quarantined == {"H01/4.dcm": "PatientName", "H01/5.dcm": "InstitutionName"}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            for value in (b"DOE^JOHN", b"GENERAL", b"P123"):
                assert value not in data, (path, value)


def test_a_policy_change_rereads_every_file(tmp_path: Path) -> None:
    archive = census_archive(tmp_path)
    out = tmp_path / "out"
    run_index(archive, out)
    report = run_index(
        archive, out, phi={"sites": {"H02": {"actions": {"InstitutionName": "retain"}}}}
    )
    assert report["files_indexed"] == 7  # H02 now passes: its rows were not reused
    assert report["phi_census"]["H02"]["InstitutionName"] == {"retain": 3}


def test_synthetic_phi_traps_stay_quarantined(tmp_path: Path) -> None:
    from ctcurate.demo.dicomwrite import LEAKED_BIRTH_DATE, LEAKED_INSTITUTION, LEAKED_NAME

    traps = {
        "name.dcm": {"PatientName": LEAKED_NAME},
        "birth.dcm": {"PatientBirthDate": LEAKED_BIRTH_DATE},
        "institution.dcm": {"InstitutionName": LEAKED_INSTITUTION},
    }
    for i, (name, attrs) in enumerate(sorted(traps.items())):
        save(ct_slice(i, **attrs), tmp_path / "H01" / name)
        out = both_paths(tmp_path, f"H01/{name}")
        assert (out.reason, out.detail) == ("phi_present", next(iter(attrs)))


def test_census_sql_splits_details_keeping_unnamed_tags_whole() -> None:
    import duckdb
    import pyarrow as pa

    from ctcurate.catalog.tables import census_tree, phi_census_sql

    instances = pa.table(  # noqa: F841 - read by DuckDB by name
        {"site": ["H1", "H1", None], "phi_accepted": [["PatientName:pseudonym"], [], ["X:dummy"]]}
    )
    quarantine = pa.table(  # noqa: F841 - read by DuckDB by name
        {
            "path": ["H1/a", "H2/b", "c"],
            "reason": ["phi_present", "phi_present", "not_dicom"],
            "detail": ["(0009,1010)>PatientName,InstitutionName", "PatientName", "x,y"],
        }
    )
    rows = duckdb.connect().execute(phi_census_sql("instances", "quarantine")).fetchall()
    assert rows == [
        ("H1", "(0009,1010)>PatientName", "phi", 1),
        ("H1", "InstitutionName", "phi", 1),
        ("H1", "PatientName", "pseudonym", 1),
        ("H2", "PatientName", "phi", 1),
        (None, "X", "dummy", 1),
    ]
    assert census_tree(rows)["(no site)"] == {"X": {"dummy": 1}}


def test_site_overrides_follow_the_site_layout_rule(tmp_path: Path) -> None:
    # TCIA-like layout: the site is the second folder, not the first
    archive = tmp_path / "archive"
    save(deidentified(0, InstitutionName="General Hospital"), archive / "dl-1" / "H02" / "a.dcm")
    save(deidentified(1, InstitutionName="General Hospital"), archive / "dl-1" / "H03" / "b.dcm")
    phi_params = {"sites": {"H02": {"actions": {"InstitutionName": "retain"}}}}
    run_index(archive, tmp_path / "out", site_from={"path_component": 1}, phi=phi_params)
    rows = {r["path"]: r for r in table(tmp_path / "out", "instances")}
    assert list(rows) == ["dl-1/H02/a.dcm"]  # retained at H02 only
    assert rows["dl-1/H02/a.dcm"]["site"] == "H02"
    quarantined = {r["path"]: r["detail"] for r in table(tmp_path / "out", "quarantine")}
    assert quarantined == {"dl-1/H03/b.dcm": "InstitutionName"}


def test_census_sites_quarantined_files_by_the_layout_rule(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    save(deidentified(0), archive / "dl-1" / "H02" / "a.dcm")
    save(ct_slice(1, PatientName="DOE^JOHN", PatientID="P123"), archive / "dl-1" / "H02" / "b.dcm")
    out = tmp_path / "out"
    report = run_index(archive, out, site_from={"path_component": -1})
    assert report["phi_census"] == {"H02": {"PatientName": {"phi": 1, "pseudonym": 1}}}
    assert report["site_from"] == {"path_component": -1}
    (out / "catalog.duckdb").unlink()  # as after a dvc pull: query rebuilds it
    text = query.run(
        catalog=out / "catalog.duckdb",
        sql="SELECT site, element, rule, files FROM phi_census ORDER BY ALL",
        fmt="csv",
    )
    assert text.splitlines()[1:] == ["H02,PatientName,phi,1", "H02,PatientName,pseudonym,1"]
