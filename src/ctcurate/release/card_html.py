"""The dataset card as one HTML page (``card.html``) and its gallery thumbnails.

The page holds what ``card.md`` holds (summary, shortcut audit, counts per split, site,
era, cohort, vendor, slice thickness, study year and label, excluded cases) as tables with
CSS bars, plus a gallery: per case one axial slice (the most lesion voxels, else the centre
of the lung) in the lung window with the lesion mask overlaid, captioned with its case id,
site, split and label. Thumbnails are small PNG files under ``card/gallery/`` loaded lazily,
so a release of thousands of cases stays light; the page has no script, no network
reference and no clock: its bytes depend only on the cases. Every string is HTML-escaped.
Only release attributes reach the page (the ones ``card.md`` uses), never DICOM header text.
"""

from __future__ import annotations

import hashlib
import html
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ctcurate.release.format import LABELS, MetaValue

HTML = "card.html"
GALLERY_DIR = "gallery"
#: Longer side of a gallery thumbnail (pixels).
THUMB_PX = 128
#: Opacity of the lesion overlay and of the lung outline on a thumbnail.
LESION_ALPHA = 0.5
OUTLINE_ALPHA = 0.7
#: File names of thumbnails are the case id when it matches this, else a hash of it.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

Rows = Sequence[Mapping[str, MetaValue]]


def esc(value: object) -> str:
    """``value`` as HTML text (quotes escaped too: safe in attributes)."""
    return html.escape(str(value), quote=True)


# --------------------------------------------------------------------------- thumbnails


def gallery_slice(label: npt.NDArray[np.uint8]) -> int:
    """The axial slice shown: most lesion (GGO or consolidation) voxels, lowest index on
    ties; without lesion the middle of the lung's z-range; without lung the middle slice."""
    lesion = (label >= LABELS["ggo"]).sum(axis=(1, 2))
    if lesion.any():
        return int(np.argmax(lesion))
    lung = np.flatnonzero((label > 0).any(axis=(1, 2)))
    if lung.size:
        return int((lung[0] + lung[-1]) // 2)
    return int(label.shape[0] // 2)


def _hex_rgb(colour: str) -> npt.NDArray[np.float64]:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _nearest(size: int, out: int) -> npt.NDArray[np.intp]:
    """Source indices of ``out`` nearest-neighbour samples over ``size`` pixels."""
    centres = (np.arange(out, dtype=np.float64) + 0.5) * size / out
    return np.minimum(centres.astype(np.intp), size - 1)


def thumbnail_size(shape_yx: tuple[int, int], spacing_yx: tuple[float, float]) -> tuple[int, int]:
    """(height, width) of a thumbnail: :data:`THUMB_PX` on the longer physical side."""
    height, width = shape_yx[0] * spacing_yx[0], shape_yx[1] * spacing_yx[1]
    longer = max(height, width)
    if longer <= 0:
        return THUMB_PX, THUMB_PX
    return (
        max(1, round(THUMB_PX * height / longer)),
        max(1, round(THUMB_PX * width / longer)),
    )


def render_thumbnail(
    image: npt.NDArray[np.int16],
    label: npt.NDArray[np.uint8],
    z: int,
    spacing_yx: tuple[float, float],
    window: tuple[float, float],
    colours: Sequence[str],
) -> npt.NDArray[np.uint8]:
    """RGB (h, w, 3) of slice ``z``: ``window`` greys, GGO and consolidation filled in
    their ``colours`` (of label values 1..3), the lung (value 1 and up) outlined."""
    h, w = thumbnail_size((image.shape[1], image.shape[2]), spacing_yx)
    rows, cols = _nearest(image.shape[1], h), _nearest(image.shape[2], w)
    hu = image[z][np.ix_(rows, cols)].astype(np.float64)
    lab = label[z][np.ix_(rows, cols)]
    lo, hi = window
    grey = np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value in (LABELS["ggo"], LABELS["consolidation"]):
        mask = lab == value
        rgb[mask] = (1 - LESION_ALPHA) * rgb[mask] + LESION_ALPHA * _hex_rgb(colours[value - 1])
    lung = np.pad(lab > 0, 1, constant_values=False)
    inner = lung[1:-1, 1:-1] & lung[:-2, 1:-1] & lung[2:, 1:-1] & lung[1:-1, :-2] & lung[1:-1, 2:]
    edge = lung[1:-1, 1:-1] & ~inner
    outline = _hex_rgb(colours[LABELS["normal_lung"] - 1])
    rgb[edge] = (1 - OUTLINE_ALPHA) * rgb[edge] + OUTLINE_ALPHA * outline
    out: npt.NDArray[np.uint8] = np.rint(rgb).astype(np.uint8)
    return out


def png_bytes(rgb: npt.NDArray[np.uint8]) -> bytes:
    """A PNG (8-bit RGB, no ancillary chunks) of ``rgb``: the same array, the same bytes."""
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    raw = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # filter byte 0 on each row
    raw[:, 1:] = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(height, 3 * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def thumbnail_name(case_id: str) -> str:
    """File name of a case's thumbnail in ``card/gallery/``."""
    if _SAFE_NAME.fullmatch(case_id):
        return f"{case_id}.png"
    return f"case-{hashlib.sha256(case_id.encode()).hexdigest()[:16]}.png"


def gallery_cases(rows: Rows, max_cases: int) -> list[str]:
    """Case ids of the gallery: all cases up to ``max_cases``; beyond, a round robin over
    the (site, label) groups (each in case-id order), so that every group is shown."""
    ids = sorted(str(r["case_id"]) for r in rows)
    if len(ids) <= max_cases:
        return ids
    groups: dict[tuple[str, str], list[str]] = {}
    for row in sorted(rows, key=lambda r: str(r["case_id"])):
        key = (str(row.get("site")), str(row.get("typical")))
        groups.setdefault(key, []).append(str(row["case_id"]))
    queues = [groups[k] for k in sorted(groups)]
    chosen: list[str] = []
    depth = 0
    while len(chosen) < max_cases:
        for queue in queues:
            if depth < len(queue) and len(chosen) < max_cases:
                chosen.append(queue[depth])
        depth += 1
    return sorted(chosen)


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class Section:
    """One count table of the page: heading and rows (group, non-typical, typical, total)."""

    heading: str
    rows: Sequence[tuple[str, int, int, int]]


@dataclass(frozen=True)
class Audit:
    """One row of the shortcut audit."""

    name: str
    groups: int
    accuracy: float
    baseline: float
    lift: float
    flagged: bool


@dataclass(frozen=True)
class Tile:
    """One gallery entry: its case, thumbnail file (relative to the page) and size."""

    case_id: str
    site: str
    split: str
    typical: int
    slice_index: int
    src: str
    height: int
    width: int


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1.5em;color:#1f2937;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;
border-bottom:1px solid #e5e7eb;padding-bottom:.2em}
nav a{margin-right:.8em}a{color:#1d4ed8}
table{border-collapse:collapse;margin:.3em 0}
th,td{padding:.25em .5em;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:middle}
th,td:first-child{white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.tables{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,460px),1fr));
gap:0 2em}.tables section{min-width:0;overflow-x:auto}
.bar{display:flex;width:120px;height:12px;background:#f3f4f6}
.bar span{display:block;height:12px}
.k0{background:#94a3b8}.k1{background:#7c3aed}
.key{display:inline-block;width:12px;height:12px;vertical-align:-1px;margin:0 .3em 0 .8em}
.risk{color:#b91c1c;font-weight:600}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px}
figure{margin:0;padding:6px;border:1px solid #e5e7eb;border-radius:4px;background:#fafafa}
figure img{display:block;margin:0 auto;background:#000;image-rendering:pixelated}
figcaption{font-size:12px;margin-top:4px;line-height:1.3;overflow-wrap:anywhere}
figcaption b{font-family:ui-monospace,monospace;font-weight:600}
.t1{color:#6d28d9}.t0{color:#475569}
""".strip()


def _bar(non_typical: int, typical: int, scale: int) -> str:
    def width(n: int) -> str:
        return f"{100.0 * n / scale:.1f}%" if scale else "0%"

    return (
        f'<div class="bar" role="img" aria-label="{non_typical} non-typical, {typical} typical">'
        f'<span class="k0" style="width:{width(non_typical)}"></span>'
        f'<span class="k1" style="width:{width(typical)}"></span></div>'
    )


def _count_table(section: Section) -> str:
    scale = max((total for *_, total in section.rows), default=0)
    head = esc(section.heading)
    out = [
        f"<table><thead><tr><th>{head}</th><th class=n>non-typical</th>"
        "<th class=n>typical</th><th class=n>total</th><th></th></tr></thead><tbody>"
    ]
    for group, n0, n1, n in section.rows:
        out.append(
            f"<tr><td>{esc(group)}</td><td class=n>{n0}</td><td class=n>{n1}</td>"
            f"<td class=n>{n}</td><td>{_bar(n0, n1, scale)}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_html(
    summary: str,
    label_note: str,
    lift_threshold: float,
    audits: Sequence[Audit],
    sections: Sequence[Section],
    excluded: Mapping[str, int],
    tiles: Sequence[Tile],
    packed: int,
    colours: Sequence[str],
    montage: str,
) -> str:
    """The page's text: every value escaped, no script, no external reference."""
    key = (
        '<span class="key k0"></span>non-typical<span class="key k1"></span>typical'
        if sections
        else ""
    )
    links = [("shortcut-audit", "shortcut audit")]
    links += [(_slug(s.heading), s.heading) for s in sections]
    links += [("excluded", "excluded"), ("gallery", "gallery")]
    nav = " ".join(f'<a href="#{esc(slug)}">{esc(text)}</a>' for slug, text in links)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        "<title>Dataset card</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Dataset card</h1>",
        f"<p>{esc(summary)}<br>The release id and this card's sha256 are in "
        "<code>manifest.json</code>.</p>",
        f"<p>{esc(label_note)}</p>",
        f"<nav>{nav}</nav>",
        '<h2 id="shortcut-audit">Shortcut audit</h2>',
        "<p>Accuracy of predicting the label from one attribute alone (majority label per "
        "group, in-sample) against always predicting the overall majority label. A large "
        f"lift (&gt; {lift_threshold:.2f}) means a model could score by recognising the "
        "attribute instead of the disease.</p>",
        "<table><thead><tr><th>attribute</th><th class=n>groups</th><th class=n>accuracy</th>"
        "<th class=n>baseline</th><th class=n>lift</th><th></th></tr></thead><tbody>",
    ]
    for a in audits:
        flag = '<span class="risk">shortcut risk</span>' if a.flagged else ""
        parts.append(
            f"<tr><td>{esc(a.name)}</td><td class=n>{a.groups}</td>"
            f"<td class=n>{a.accuracy:.3f}</td><td class=n>{a.baseline:.3f}</td>"
            f"<td class=n>{a.lift:+.3f}</td><td>{flag}</td></tr>"
        )
    parts.append(f"</tbody></table><h2>Cases</h2><p>{key}</p><div class=tables>")
    for section in sections:
        parts.append(
            f'<section><h3 id="{_slug(section.heading)}">Cases by {esc(section.heading)}</h3>'
            f"{_count_table(section)}</section>"
        )
    parts += [
        "</div>",
        '<h2 id="excluded">Excluded cases</h2>',
        "<table><thead><tr><th>reason</th><th class=n>cases</th></tr></thead><tbody>",
        *(
            f"<tr><td>{esc(reason)}</td><td class=n>{n}</td></tr>"
            for reason, n in sorted(excluded.items())
        ),
        *([] if excluded else ["<tr><td>none</td><td class=n>0</td></tr>"]),
        "</tbody></table>",
        '<h2 id="gallery">Gallery</h2>',
        f"<p>{len(tiles)} of {packed} cases, one axial slice each (the slice with the most "
        "lesion voxels, else the centre of the lung), lung window: "
        f'<span class="key" style="background:{esc(colours[1])}"></span>ground-glass opacity'
        f'<span class="key" style="background:{esc(colours[2])}"></span>consolidation'
        f'<span class="key" style="background:{esc(colours[0])}"></span>lung outline. '
        f'Example cases by label: <a href="{esc(montage)}">montage</a>.</p>',
        '<div class="gallery">',
    ]
    for t in tiles:
        label = "typical" if t.typical == 1 else "non-typical"
        alt = f"case {t.case_id}, slice {t.slice_index}"
        parts.append(
            f'<figure id="case-{esc(t.case_id)}"><img loading="lazy" src="{esc(t.src)}" '
            f'width="{t.width}" height="{t.height}" alt="{esc(alt)}">'
            f"<figcaption><b>{esc(t.case_id)}</b><br>{esc(t.site)} · {esc(t.split)} · "
            f'<span class="t{1 if t.typical == 1 else 0}">{esc(label)}</span>'
            f"<br>slice {t.slice_index}</figcaption></figure>"
        )
    parts += ["</div>", "</body></html>", ""]
    return "\n".join(parts)
