"""Releases: what ``pack`` writes and consumers read.

The consumer's API: :func:`open` (a torch / MONAI dataset over a release), :func:`verify`
(re-hash and cross-check a release), :func:`read_manifest` and :func:`read_case` (h5py and
numpy only), and the label values :data:`LABELS`. The on-disk layout lives in
:mod:`ctcurate.release.format` (documented in ``docs/release.md``), the manifest's structure
in :mod:`ctcurate.release.manifest`, the checks of ``verify`` in :mod:`ctcurate.release.integrity`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctcurate.errors import VerifyError
from ctcurate.release.format import LABELS, MANIFEST, manifest_release_id, read_case, read_manifest

#: The consumer's API: open, verify, and the two readers of the format.
__all__ = ["LABELS", "open", "read_case", "read_manifest", "verify"]

if TYPE_CHECKING:
    from collections.abc import Callable

    from ctcurate.release.dataset import ReleaseDataset


def verify(release_dir: Path | str, expect: str | None = None) -> str:
    """Check a release against its manifest, and the manifest against ``expect``.

    Re-hashes every shard, case and file; compares every manifest case entry (labels,
    split, every attribute) with the attributes stored in its shard, and each shard's cases
    with the manifest's list for it. ``expect`` is the release id to hold the release to,
    taken from somewhere the release cannot edit (``dvc.lock`` in git, see
    ``docs/release.md``): the manifest's own ``release_id`` only proves it is consistent.

    Returns a one-line summary; raises :class:`VerifyError` naming the first mismatch.
    """
    from ctcurate.release.integrity import verify_release

    return verify_release(Path(release_dir), expect)


def open(
    release_dir: Path | str,
    split: str | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    expect: str | None = None,
    meta_tensor: bool = False,
) -> ReleaseDataset:
    """Open a release as a torch / MONAI map-style dataset of dict samples.

    Each sample is ``{"image": float32 (1, z, y, x) HU, "label": int64 (1, z, y, x),
    "typical": int (-1 unknown), "case_id": str, "meta": dict}``; ``split`` picks
    ``train`` / ``val`` / ``test`` (all cases when None). Shards are opened once per
    DataLoader worker process. With ``expect`` (a release id from ``dvc.lock``), the
    release is first verified against it (:func:`verify`: one read of every shard);
    without it, nothing is checked. With ``meta_tensor`` (needs MONAI), ``image`` and
    ``label`` are MONAI ``MetaTensor`` s carrying the case's RAS+ affine
    (:func:`case_affine_zyx`) and ``filename_or_obj`` = case id, so MONAI's spatial
    transforms and ``SaveImaged`` work on them.
    """
    from ctcurate.release.dataset import ReleaseDataset

    def dataset() -> ReleaseDataset:
        return ReleaseDataset(
            Path(release_dir), split=split, transform=transform, meta_tensor=meta_tensor
        )

    if expect is None:
        return dataset()
    verify(release_dir, expect=expect)
    data = dataset()
    if manifest_release_id(data.manifest) != expect.strip().lower():  # replaced since
        msg = f"{Path(release_dir) / MANIFEST}: changed while it was being verified"
        raise VerifyError(msg)
    return data
