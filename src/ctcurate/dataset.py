"""The consumer side of a release: a torch map-style dataset of dict samples."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ctcurate.errors import InputError
from ctcurate.release import MANIFEST_ONLY, SHARD_DIR, read_arrays, read_manifest


class ReleaseDataset(Dataset[dict[str, Any]]):
    """Cases of a release, optionally one split, as MONAI-style dict samples.

    HDF5 shards are opened lazily and once per process, so the dataset can be handed to a
    ``torch.utils.data.DataLoader`` with several workers (each opens its own handles).
    """

    def __init__(
        self,
        release_dir: Path,
        split: str | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.release_dir = Path(release_dir)
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
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.cases)

    def _shard(self, name: str) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: own handles
            self._handles = {}
            self._pid = os.getpid()
        if name not in self._handles:
            self._handles[name] = h5py.File(self.release_dir / SHARD_DIR / name, "r")
        return self._handles[name]

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        image, label = read_arrays(self._shard(str(case["shard"])), str(case["case_id"]))
        # The manifest entry holds the same attributes as the HDF5 group (both are written
        # from one mapping and covered by the case hash); reading them there is faster.
        meta = {k: v for k, v in case.items() if k not in MANIFEST_ONLY}
        typical = meta.get("typical")
        sample: dict[str, Any] = {
            "image": torch.from_numpy(image.astype(np.float32)[None]),
            "label": torch.from_numpy(label.astype(np.int64)[None]),
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

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
