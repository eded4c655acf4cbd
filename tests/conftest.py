"""Session-wide fixtures: built once, shared by every test module that asks for them.

- ``tiny_archive``: a synthetic hospital archive of 6 patients, 32² slices (``synth.run``).
- ``pack_inputs`` / ``pack_release``: the 14-case pack input and its release
  (``helpers.release``).
- ``demo_build``: ``dvc repro`` of the whole pipeline on a tiny archive in a copy of the
  project (the ``e2e`` tests), once per session.

Tests treat them as read-only: one that changes files works on a copy (``shutil.copytree``).
Markers (registered in pyproject.toml): ``slow`` (seconds to a minute), ``e2e`` (the DVC
pipeline end to end), ``realdata`` (real public DICOM), ``browser`` (headless Chromium).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by the fixtures: a run of a few fast modules loads none of it
    from helpers.demo import DemoBuild
    from helpers.release import Inputs


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth.run`` output with ``helpers.synth.TINY_ARCHIVE``: archive/, annotations/,
    truth tables."""
    from helpers.synth import TINY_ARCHIVE

    from ctcurate.pipeline.synth import run

    out = tmp_path_factory.mktemp("synth") / "synth"
    run(out, TINY_ARCHIVE)
    return out


@pytest.fixture(scope="session")
def pack_inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """14 cases from 10 patients on 2 sites: 9 packable, 5 excluded for 5 reasons."""
    from helpers.release import make_inputs

    return make_inputs(tmp_path_factory.mktemp("packin"))


@pytest.fixture(scope="session")
def pack_release(pack_inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release of ``pack_inputs`` with ``helpers.release.PARAMS`` (9 cases, 3 shards)."""
    from helpers.release import PARAMS

    from ctcurate.pipeline import pack

    out = tmp_path_factory.mktemp("rel") / "release"
    pack.run(
        cases=pack_inputs.cases,
        index_dir=pack_inputs.index_dir,
        archive=pack_inputs.archive,
        annotations_dir=pack_inputs.annotations,
        out=out,
        params=PARAMS,
    )
    return out


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> DemoBuild:
    """The whole pipeline, built once by ``dvc repro`` (see ``helpers.demo.build_demo``)."""
    from helpers.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))
