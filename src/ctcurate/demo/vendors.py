"""Sites, their scanners' tag habits and their export folder layouts."""

from __future__ import annotations

from dataclasses import dataclass

PrivateBlock = tuple[int, str, tuple[tuple[int, str, object], ...]]
"""(group, private creator, ((element offset, VR, value), ...)): one vendor private block."""


@dataclass(frozen=True)
class Vendor:
    """Tag habits of one scanner vendor."""

    manufacturer: str
    model: str
    lung_kernel: str
    soft_kernel: str
    rescale_intercept: float
    private: tuple[PrivateBlock, ...]
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
    private=(
        (0x0009, "GEMS_IDEN_01", ((0x01, "LO", "CT_LIGHTSPEED"), (0x27, "SL", 0))),
        (0x0019, "GEMS_ACQU_01", ((0x23, "DS", "39.375"), (0x9E, "LO", "HELICAL"))),
        (0x0043, "GEMS_PARM_01", ((0x27, "SH", "/1.375:1"), (0x61, "UI", "1.2.840.113619.2"))),
    ),
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
    private=(
        (0x0019, "SIEMENS CT VA0  COAD", ((0x92, "DS", "1.2"), (0xA2, "UL", 1))),
        (0x0021, "SIEMENS MED", ((0x11, "DS", "0"), (0x20, "CS", "CT_SOM5 SPI"))),
        (
            0x0029,
            "SIEMENS CSA HEADER",
            ((0x08, "CS", "IMAGE NUM 4"), (0x10, "OB", b"SV10\x04\x03\x02\x01\x00\x00\x00")),
        ),
    ),
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
    private=(
        (0x7005, "TOSHIBA_MEC_CT3", ((0x08, "CS", "AQUILION"), (0x0B, "CS", "ORG"))),
        (0x7005, "TOSHIBA_MEC_CT3_EXT", ((0x31, "SH", "AIDR 3D STD"),)),
    ),
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
    private=(
        (0x01F1, "ELSCINT1", ((0x01, "CS", "HELICAL"), (0x26, "DS", "0.671"))),
        (0x00E1, "ELSCINT1", ((0x21, "DS", "2"), (0x50, "DS", "11.3"))),
        (0x2001, "Philips Imaging DD 001", ((0x10, "CS", "NO"),)),
    ),
    localizer="Surview",
    dose="Dose Info",
    series_numbers=(1, 201, 202, 601),
)


@dataclass(frozen=True)
class Site:
    """A sending hospital: its scanner, its lung protocol and its export layout.

    ``thin_mm`` / ``thin_p`` are the thin lung recon thicknesses the site uses and how
    often; ``matrix_scale`` scales the archive's ``matrix`` param to the site's in-plane
    matrix (a site exporting downsampled 384 or 256 matrices next to 512 ones).
    """

    code: str
    vendor: Vendor
    layout: str  # "nested" | "flat" | "numbered" | "uid_tree" | "flat_numbered"
    thin_mm: tuple[float, ...]
    thin_p: tuple[float, ...]
    matrix_scale: float

    def matrix(self, base: int) -> int:
        """The site's in-plane matrix for the archive's ``matrix`` param (even, ≥ 32)."""
        return max(32, 2 * round(base * self.matrix_scale / 2))


SITES: tuple[Site, ...] = (
    Site("H01", GE, "nested", (0.625, 1.25, 2.5), (0.15, 0.45, 0.4), 1.0),
    Site("H02", SIEMENS, "flat", (1.0, 1.5, 2.0), (0.3, 0.4, 0.3), 1.0),
    Site("H03", TOSHIBA, "numbered", (1.0, 2.0, 3.0), (0.3, 0.4, 0.3), 0.75),
    Site("H04", PHILIPS, "uid_tree", (0.9, 2.0, 3.0), (0.2, 0.4, 0.4), 1.0),
    Site("H05", SIEMENS, "flat_numbered", (2.0, 3.0), (0.5, 0.5), 0.625),
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
