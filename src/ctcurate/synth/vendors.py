"""Sites, their scanners' tag habits and their export folder layouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vendor:
    """Tag habits of one scanner vendor."""

    manufacturer: str
    model: str
    lung_kernel: str
    soft_kernel: str
    rescale_intercept: float
    private_group: int
    private_creator: str
    private_value: str
    localizer: str
    dose: str
    series_numbers: tuple[int, int, int, int]  # localizer, thin, thick, dose report

    def thin_description(self, thickness: float) -> str:
        """Series description of the thin lung recon."""
        return {
            "GE MEDICAL SYSTEMS": f"Chest {thickness:g}mm Lung",
            "SIEMENS": f"Thorax {thickness:.1f} {self.lung_kernel}",
            "TOSHIBA": f"Lung {thickness:.1f} {self.lung_kernel}",
            "Philips": f"Chest {thickness:g}mm {self.lung_kernel}",
        }[self.manufacturer]

    def thick_description(self) -> str:
        """Series description of the thick soft-tissue recon."""
        return {
            "GE MEDICAL SYSTEMS": "5mm Std",
            "SIEMENS": f"Thorax 5.0 {self.soft_kernel}",
            "TOSHIBA": f"Mediastinum 5.0 {self.soft_kernel}",
            "Philips": f"Chest 5mm {self.soft_kernel}",
        }[self.manufacturer]


GE = Vendor(
    manufacturer="GE MEDICAL SYSTEMS",
    model="LightSpeed VCT",
    lung_kernel="LUNG",
    soft_kernel="STANDARD",
    rescale_intercept=-1024.0,
    private_group=0x0009,
    private_creator="GEMS_IDEN_01",
    private_value="CT_LIGHTSPEED",
    localizer="Scout",
    dose="Dose Report",
    series_numbers=(1, 2, 3, 999),
)
SIEMENS = Vendor(
    manufacturer="SIEMENS",
    model="SOMATOM Definition AS",
    lung_kernel="B70f",
    soft_kernel="B30f",
    rescale_intercept=-1024.0,
    private_group=0x0019,
    private_creator="SIEMENS CT VA0  COAD",
    private_value="CT_SOM5 SPI",
    localizer="Topogram  0.6  T20s",
    dose="Patient Protocol",
    series_numbers=(1, 4, 5, 501),
)
TOSHIBA = Vendor(
    manufacturer="TOSHIBA",
    model="Aquilion ONE",
    lung_kernel="FC51",
    soft_kernel="FC13",
    rescale_intercept=0.0,
    private_group=0x7005,
    private_creator="TOSHIBA_MEC_CT3",
    private_value="AQUILION",
    localizer="Scanogram",
    dose="Dose Info",
    series_numbers=(1, 2, 3, 9001),
)
PHILIPS = Vendor(
    manufacturer="Philips",
    model="Brilliance 64",
    lung_kernel="YC",
    soft_kernel="B",
    rescale_intercept=-1000.0,
    private_group=0x01F1,
    private_creator="ELSCINT1",
    private_value="BRILLIANCE",
    localizer="Surview",
    dose="Dose Info",
    series_numbers=(1, 201, 202, 601),
)


@dataclass(frozen=True)
class Site:
    """A sending hospital: its scanner and how its export is laid out on disk."""

    code: str
    vendor: Vendor
    layout: str  # "nested" | "flat" | "numbered" | "uid_tree" | "flat_numbered"


SITES: tuple[Site, ...] = (
    Site("H01", GE, "nested"),
    Site("H02", SIEMENS, "flat"),
    Site("H03", TOSHIBA, "numbered"),
    Site("H04", PHILIPS, "uid_tree"),
    Site("H05", SIEMENS, "flat_numbered"),
)
SITE_BY_CODE = {site.code: site for site in SITES}


@dataclass(frozen=True)
class SeriesKey:
    """What a layout needs to know to name one series' files."""

    patient_id: str
    patient_index: int
    study_index: int
    study_uid: str
    study_date: str
    series_uid: str
    series_number: int


def series_files(site: Site, key: SeriesKey, sop_uids: list[str], counter: int) -> list[str]:
    """Relative paths (under the site folder) of a series' files, in instance order.

    ``counter`` is the site-wide running file number used by the numbered layouts.
    """
    n = len(sop_uids)
    if site.layout == "nested":
        folder = f"{key.patient_id}/{key.study_date}_{key.study_index:03d}/S{key.series_number:04d}"
        return [f"{folder}/IM{i + 1:04d}.dcm" for i in range(n)]
    if site.layout == "flat":
        return [f"CT.{uid}.dcm" for uid in sop_uids]
    if site.layout == "numbered":
        folder = (
            f"DICOM/PA{key.patient_index:06d}/ST{key.study_index:06d}/SE{key.series_number:06d}"
        )
        return [f"{folder}/IM{i:06d}" for i in range(n)]
    if site.layout == "uid_tree":
        return [f"{key.study_uid}/{key.series_uid}/{uid}.dcm" for uid in sop_uids]
    if site.layout == "flat_numbered":
        return [f"{counter + i:08d}" for i in range(n)]
    msg = f"unknown layout {site.layout!r}"
    raise ValueError(msg)
