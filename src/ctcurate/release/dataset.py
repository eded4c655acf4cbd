"""The consumer side of a release: a torch map-style dataset of dict samples."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from ctcurate.errors import InputError
from ctcurate.release.format import (
    CASES_GROUP,
    IMAGE,
    LABEL,
    MANIFEST_ONLY,
    SHARD_DIR,
    case_affine_zyx,
    read_manifest,
)


class ReleaseDataset(Dataset[dict[str, Any]]):
    """Cases of a release, optionally one split, as MONAI-style dict samples.

    HDF5 shards are opened lazily and once per process, so the dataset can be handed to a
    ``torch.utils.data.DataLoader`` with several workers (each opens its own handles).
    A case's datasets are looked up once per process too; shards are opened without a
    chunk cache (each sample is read once per epoch, so a cache would only hold memory).
    """

    def __init__(
        self,
        release_dir: Path,
        split: str | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        meta_tensor: bool = False,
    ) -> None:
        self.release_dir = Path(release_dir)
        self.meta_tensor = meta_tensor
        if meta_tensor:
            import monai.data  # noqa: F401  (fail here, not in a DataLoader worker)
        self.manifest = read_manifest(self.release_dir)
        cases = self.manifest["cases"]
        if split is not None:
            known = sorted(self.manifest.get("splits", {}))
            if split not in known:
                msg = f"{self.release_dir}: no split '{split}' (have: {', '.join(known)})"
                raise InputError(msg)
            cases = [c for c in cases if c.get("split") == split]
        self.cases: list[dict[str, Any]] = sorted(cases, key=lambda c: str(c["case_id"]))
        self.transform = transform
        self._handles: dict[str, h5py.File] = {}
        self._datasets: dict[str, tuple[h5py.Dataset, h5py.Dataset]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.cases)

    def _shard(self, name: str) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: own handles
            self._handles = {}
            self._datasets = {}
            self._pid = os.getpid()
        if name not in self._handles:
            path = self.release_dir / SHARD_DIR / name
            self._handles[name] = h5py.File(path, "r", rdcc_nbytes=0)
        return self._handles[name]

    def _case_datasets(self, case: dict[str, Any]) -> tuple[h5py.Dataset, h5py.Dataset]:
        case_id = str(case["case_id"])
        shard = self._shard(str(case["shard"]))  # first: resets the lookups after a fork
        if case_id not in self._datasets:
            grp = shard[CASES_GROUP][case_id]
            self._datasets[case_id] = (grp[IMAGE], grp[LABEL])
        return self._datasets[case_id]

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        image_ds, label_ds = self._case_datasets(case)
        image = _read(image_ds, np.int16)
        label = _read(label_ds, np.uint8)
        # The manifest entry holds the same attributes as the HDF5 group (both are written
        # from one mapping; `verify` / `open(expect=...)` check they still are, the case
        # hash covers the group's); reading them there is faster.
        meta = {k: v for k, v in case.items() if k not in MANIFEST_ONLY}
        typical = meta.get("typical")
        image_t, label_t = _widen(image, torch.float32), _widen(label, torch.int64)
        if self.meta_tensor:
            image_t, label_t = _as_meta_tensors(case, image_t, label_t)
        sample: dict[str, Any] = {
            "image": image_t,
            "label": label_t,
            "typical": int(typical) if isinstance(typical, int | float) else -1,
            "case_id": str(case["case_id"]),
            # None → "null" (the attribute convention) so default_collate can batch it.
            "meta": {k: "null" if v is None else v for k, v in meta.items()},
        }
        return self.transform(sample) if self.transform is not None else sample

    def close(self) -> None:
        """Close every open shard of this process."""
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
        self._datasets = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_datasets"] = {}
        return state


def _as_meta_tensors(
    case: dict[str, Any], image: torch.Tensor, label: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` and ``label`` as MONAI ``MetaTensor`` s with the case's RAS+ affine."""
    from monai.data.meta_tensor import MetaTensor

    affine = torch.as_tensor(case_affine_zyx(case), dtype=torch.float64)
    meta = {"filename_or_obj": str(case["case_id"]), "space": "RAS"}
    return (
        MetaTensor(image, affine=affine.clone(), meta=dict(meta)),
        MetaTensor(label, affine=affine.clone(), meta=dict(meta)),
    )


def _read(dataset: h5py.Dataset, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """The whole dataset, decompressed straight into a fresh array of the stored dtype."""
    out = np.empty(dataset.shape, dtype=dtype)
    if out.size:
        dataset.id.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
    return out


def _widen(array: npt.NDArray[Any], dtype: torch.dtype) -> torch.Tensor:
    """``array`` with a leading channel axis, converted in one pass into a new tensor."""
    tensor = torch.empty((1, *array.shape), dtype=dtype)
    tensor.numpy()[0] = array
    return tensor
