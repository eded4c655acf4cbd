"""card.html: the dataset card as a page, its gallery thumbnails, and how a browser renders it.

The ``browser`` tests open the page in headless Chromium (skipped, with the reason, when no
Chromium binary is installed; ``.ci/run`` installs one).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from helpers.release import PARAMS, Inputs

import ctcurate.release
from ctcurate.errors import VerifyError
from ctcurate.pipeline import pack
from ctcurate.release import card, card_html
from ctcurate.release.format import read_arrays


@pytest.fixture(scope="module")
def release(pack_release: Path) -> Path:
    """The 14-case test release (9 packed: 2 sites, 3 splits, both labels, 5 excluded)."""
    return pack_release


def _manifest(release: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((release / "manifest.json").read_text())
    return data


class _Page(HTMLParser):
    """The tables (by the id of the heading before them), figures and every attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.figures: dict[str, dict[str, Any]] = {}
        self.attrs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: Counter[str] = Counter()
        self._heading = ""
        self._rows: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self._figure: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        values = {k: v or "" for k, v in attrs}
        self.attrs += [(tag, k, v) for k, v in values.items()]
        if tag in ("h2", "h3") and "id" in values:
            self._heading = values["id"]
        elif tag == "table":
            self._rows = self.tables.setdefault(self._heading, [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "figure":
            self._figure = {"id": values.get("id", ""), "text": []}
        elif tag == "img" and self._figure is not None:
            self._figure["img"] = values

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._rows:
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._rows = None
        elif tag == "figure" and self._figure is not None:
            self._figure["text"] = " ".join("".join(self._figure["text"]).split())
            self.figures[self._figure["id"]] = self._figure
            self._figure = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._figure is not None:
            self._figure["text"].append(data + " ")


def _page(release: Path) -> _Page:
    parser = _Page()
    parser.feed((release / "card.html").read_text(encoding="utf-8"))
    parser.close()
    return parser


def _counts(table: list[list[str]]) -> dict[str, tuple[int, int]]:
    """{group: (non-typical, typical)} of a count table (header row dropped)."""
    return {row[0]: (int(row[1]), int(row[2])) for row in table[1:]}


def _expected(cases: list[dict[str, Any]], key: str) -> dict[str, tuple[int, int]]:
    tally: dict[str, list[int]] = {}
    for case in cases:
        value = case.get(key)
        group = (
            "unknown"
            if value is None
            else (f"{value:g}" if isinstance(value, float) else str(value))
        )
        tally.setdefault(group, [0, 0])[1 if case["typical"] == 1 else 0] += 1
    return {g: (n[0], n[1]) for g, n in tally.items()}


def test_card_html_counts_match_the_manifest(release: Path) -> None:
    manifest = _manifest(release)
    cases = manifest["cases"]
    page = _page(release)
    for heading, key in card.GROUPINGS:
        table = page.tables[re.sub(r"[^a-z0-9]+", "-", heading).strip("-")]
        assert table[0][:4] == [heading, "non-typical", "typical", "total"]
        assert _counts(table) == _expected(cases, key), heading
        assert all(int(r[3]) == int(r[1]) + int(r[2]) for r in table[1:])
    typical = sum(1 for c in cases if c["typical"] == 1)
    assert _counts(page.tables["label"]) == {
        "non-typical (0)": (len(cases) - typical, 0),
        "typical (1)": (0, typical),
    }
    excluded = Counter(e["reason"] for e in manifest["excluded"])
    assert {r[0]: int(r[1]) for r in page.tables["excluded"][1:]} == excluded
    text = (release / "card.html").read_text()
    assert card.summary_line(cases, manifest["excluded"]) in text
    assert f"{len(cases)} cases packed ({typical} typical" in text


def test_card_html_holds_what_card_md_reports(release: Path) -> None:
    """Every table row of card.md (shortcut audit, counts, exclusions) is a row of the page."""
    page = _page(release)
    rows = {tuple(r[:5]) for table in page.tables.values() for r in table}
    markdown = (release / "card.md").read_text().splitlines()
    checked = 0
    for line in markdown:
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        cells = [c for c in cells if c]
        if cells[0] in ("attribute", "reason") or cells[1:4] == ["non-typical", "typical", "total"]:
            continue  # header rows
        if cells[-1] == "shortcut risk":
            cells = cells[:-1]
            assert any(r[0] == cells[0] for r in page.tables["shortcut-audit"])
        assert any(tuple(r[: len(cells)]) == tuple(cells) for r in rows), line
        checked += 1
    assert checked >= 15
    assert "shortcut risk" in (release / "card.html").read_text()  # study year, in this release


def test_gallery_shows_every_case_with_a_decodable_overlay(release: Path) -> None:
    from PIL import Image

    manifest = _manifest(release)
    page = _page(release)
    assert len(page.figures) == len(manifest["cases"])
    for case in manifest["cases"]:
        cid = case["case_id"]
        figure = page.figures[f"case-{cid}"]
        label = "typical" if case["typical"] == 1 else "non-typical"
        assert f"{cid} {case['site']} · {case['split']} · {label}" in figure["text"]
        img = figure["img"]
        assert img["loading"] == "lazy"
        src = img["src"]
        assert src == f"card/gallery/{cid}.png"
        assert src in manifest["files"]
        with Image.open(release / src) as decoded:
            rgb = np.asarray(decoded.convert("RGB"))
            assert decoded.format == "PNG"
        assert max(rgb.shape[:2]) == card_html.THUMB_PX
        assert (int(img["height"]), int(img["width"])) == rgb.shape[:2]
        with h5py.File(release / "shards" / case["shard"], "r") as h5:
            image, labels = read_arrays(h5, cid)
        z = card_html.gallery_slice(labels)
        assert f"slice {z}" in figure["text"]
        assert (labels[z] >= 2).sum() == (labels >= 2).sum(axis=(1, 2)).max()
        spacing = (case["spacing_mm"][1], case["spacing_mm"][2])
        rendered = card_html.render_thumbnail(
            image, labels, z, spacing, card.MONTAGE_WINDOW, card.LABEL_COLOURS
        )
        assert np.array_equal(rgb, rendered)  # that slice of that case
        # the GGO overlay is there: orange pixels (grey ones have R == G == B)
        orange = (rgb[..., 0].astype(int) - rgb[..., 2] > 60).sum()
        assert orange > 0, cid


def test_card_html_references_nothing_outside_the_release(release: Path) -> None:
    page = _page(release)
    text = (release / "card.html").read_text()
    files = _manifest(release)["files"]
    assert "http://" not in text
    assert "https://" not in text
    assert page.tags["script"] == 0
    assert page.tags["link"] == 0
    assert "@import" not in text
    assert "url(" not in text
    refs = [(tag, v) for tag, attr, v in page.attrs if attr in ("src", "href")]
    assert refs
    for tag, value in refs:
        if value.startswith("#"):
            assert f'id="{value[1:]}"' in text, value
            continue
        assert "://" not in value
        assert not value.startswith(("/", "data:", "javascript:")), value
        assert value in files, (tag, value)  # hashed by the manifest: verify checks it


def test_verify_accepts_the_page_and_its_gallery_and_catches_a_lost_thumbnail(
    release: Path, tmp_path: Path
) -> None:
    files = _manifest(release)["files"]
    assert "card.html" in files
    assert sum(1 for f in files if f.startswith("card/gallery/")) == 9
    assert ctcurate.release.verify(release).startswith("release ")
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    lost = sorted(f for f in files if f.startswith("card/gallery/"))[0]
    (copy / lost).unlink()
    with pytest.raises(VerifyError, match="file listed in the manifest is missing"):
        ctcurate.release.verify(copy)


def test_every_string_of_the_page_is_escaped() -> None:
    evil = '<script>alert("x")</script>&'
    rows = [
        {"case_id": "c1", "site": evil, "split": "train", "typical": 1, "manufacturer": evil},
        {"case_id": "c2", "site": "H1", "split": evil, "typical": 0, "era": evil},
    ]
    tiles = [
        card_html.Tile("c<1>", evil, evil, 1, 0, "card/gallery/x.png", 128, 128),
    ]
    text = card.render_html(rows, [{"case_id": "c3", "reason": evil}], tiles)
    assert "<script" not in text
    assert evil not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in text
    assert 'id="case-c&lt;1&gt;"' in text
    parsed = _Page()
    parsed.feed(text)
    assert parsed.tags["script"] == 0
    assert parsed.tables["excluded"][1] == [evil, "1"]


def test_png_bytes_are_deterministic_and_decode_to_the_array() -> None:
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    data = card_html.png_bytes(rgb)
    assert data == card_html.png_bytes(rgb.copy())
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), rgb)
    assert b"tIME" not in data
    assert b"tEXt" not in data


def test_gallery_slice_is_the_largest_lesion_else_the_lung_centre() -> None:
    label = np.zeros((9, 4, 4), dtype=np.uint8)
    label[2:7] = 1
    assert card_html.gallery_slice(label) == 4  # lung centre
    label[3, 0, :2] = 2
    label[5, :2, :2] = 3  # consolidation counts as lesion: 4 voxels beat 2
    assert card_html.gallery_slice(label) == 5
    assert card_html.gallery_slice(np.zeros((6, 4, 4), dtype=np.uint8)) == 3


def test_thumbnail_keeps_the_physical_aspect() -> None:
    assert card_html.thumbnail_size((64, 64), (4.0, 4.0)) == (128, 128)
    assert card_html.thumbnail_size((32, 64), (4.0, 4.0)) == (64, 128)
    assert card_html.thumbnail_size((64, 64), (2.0, 4.0)) == (64, 128)
    image = np.full((3, 6, 6), -1000, dtype=np.int16)
    label = np.zeros((3, 6, 6), dtype=np.uint8)
    label[1, 1:5, 1:5] = 1
    label[1, 2:4, 2:4] = 3
    rgb = card_html.render_thumbnail(image, label, 1, (1.0, 1.0), (-1000, 400), card.LABEL_COLOURS)
    assert rgb.shape == (128, 128, 3)
    red = card_html._hex_rgb(card.LABEL_COLOURS[2]) * card_html.LESION_ALPHA  # over black
    assert np.array_equal(rgb[64, 64], np.rint(red).astype(np.uint8))
    assert np.array_equal(rgb[0, 0], [0, 0, 0])  # air, no overlay


def test_gallery_cap_samples_every_site_and_label() -> None:
    rows = [{"case_id": f"c{i:02d}", "site": f"H{i % 3}", "typical": i // 3 % 2} for i in range(30)]
    chosen = card_html.gallery_cases(rows, 6)  # type: ignore[arg-type]
    assert len(chosen) == 6
    assert chosen == sorted(chosen)
    groups = {(r["site"], r["typical"]) for r in rows if r["case_id"] in chosen}
    assert len(groups) == 6
    assert card_html.gallery_cases(list(reversed(rows)), 6) == chosen  # type: ignore[arg-type]
    assert card_html.gallery_cases(rows, 0) == []  # type: ignore[arg-type]
    assert len(card_html.gallery_cases(rows, 100)) == 30  # type: ignore[arg-type]


def test_pack_caps_the_gallery_with_its_param(pack_inputs: Inputs, tmp_path: Path) -> None:
    inputs = pack_inputs
    out = tmp_path / "release"
    pack.run(
        cases=inputs.cases,
        index_dir=inputs.index_dir,
        archive=inputs.archive,
        annotations_dir=inputs.annotations,
        out=out,
        params=PARAMS.model_copy(update={"card_gallery_max_cases": 3}),
    )
    assert len(list((out / "card" / "gallery").iterdir())) == 3
    assert len(_page(out).figures) == 3
    assert "3 of 9 cases" in (out / "card.html").read_text()
    assert _manifest(out)["params"]["card_gallery_max_cases"] == 3
    assert ctcurate.release.verify(out).startswith("release ")


# --------------------------------------------------------------------------- in a browser

CHROMIUM = next(
    (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (apt-get install chromium; .ci/run installs it)",
)
#: Appended to a copy of the page: loads every image now (not lazily) and reports how many
#: decoded on the console.
IMAGE_CHECK = (
    "<script>const imgs=[...document.images];imgs.forEach(i=>{i.loading='eager'});"
    "Promise.allSettled(imgs.map(i=>i.decode())).then(r=>{console.log('card-check images='"
    "+imgs.length+' broken='+r.filter(x=>x.status!=='fulfilled').length)});</script>"
)
WINDOW = (1280, 2400)


def _chromium(page: Path, *args: str) -> list[str]:
    """Run headless Chromium on ``page``; its console messages."""
    assert CHROMIUM is not None
    profile = page.parent.parent / f"profile-{page.stem}"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return re.findall(r":CONSOLE[^\]]*\] (.*)", proc.stderr)


def _image_check(page: Path) -> list[str]:
    """Chromium's console on a page with :data:`IMAGE_CHECK`, once the check has logged:
    headless Chromium may exit before the images' decode promises settle (a cold start
    on a loaded machine), so a run without the check's line is repeated with more time."""
    console: list[str] = []
    for budget in (5000, 20000, 60000):
        console = _chromium(page, f"--virtual-time-budget={budget}")
        if any("card-check" in line for line in console):
            break
    return console


def _with_image_check(release: Path, dest: Path) -> Path:
    shutil.copytree(release, dest)
    page = dest / "check.html"
    page.write_text((dest / "card.html").read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    return page


@pytest.mark.browser
@needs_chromium
def test_card_html_renders_in_chromium_without_console_errors(
    release: Path, tmp_path: Path
) -> None:
    from PIL import Image

    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    shot = tmp_path / "card.png"
    console = _chromium(
        copy / "card.html",
        f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--virtual-time-budget=5000",
    )
    assert console == []  # the page runs no script: any message is an error
    with Image.open(shot) as image:
        assert image.size == WINDOW
        pixels = {tuple(p) for p in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    # the CSS was applied: the legend's and the bars' colours are on screen
    for colour in (card.LABEL_COLOURS[1], card.LABEL_COLOURS[2], "#7c3aed", "#94a3b8"):
        assert tuple(card_html._hex_rgb(colour).astype(int)) in pixels, colour

    console = _image_check(_with_image_check(release, tmp_path / "checked"))
    assert len(console) == 1
    assert console[0].startswith('"card-check images=9 broken=0"'), console


@pytest.mark.browser
@needs_chromium
def test_chromium_check_catches_a_missing_thumbnail(release: Path, tmp_path: Path) -> None:
    page = _with_image_check(release, tmp_path / "checked")
    next((page.parent / "card" / "gallery").iterdir()).unlink()
    console = _image_check(page)
    assert any("card-check images=9 broken=1" in line for line in console), console
