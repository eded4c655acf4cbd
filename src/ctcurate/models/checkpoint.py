"""A models folder: its file names, the card format, loading it, and the torch device.

Written by ``train``; read by ``evaluate``, ``predict`` and anyone with a models folder.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ctcurate.errors import InputError, ParamsError
from ctcurate.models.nets import LogisticModel, build_unet

SEG_FILE = "seg.pt"
LAST_FILE = "seg_last.pt"
CLASSIFIER_FILE = "classifier.json"
MODEL_FILE = "model.json"


MODEL_FORMAT = "ctcurate-model"
MODEL_FORMAT_VERSION = 1


def resolve_device(requested: str, section: str = "train") -> torch.device:
    """The torch device of ``<section>.device``: ``auto`` picks CUDA when present.

    Raises :class:`ParamsError` when ``cuda`` is requested and CUDA is not available.
    """
    if requested == "cuda":
        if not torch.cuda.is_available():
            msg = f"{section}.device is 'cuda' but CUDA is not available on this machine"
            raise ParamsError(msg)
        return torch.device("cuda")
    if requested == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int, threads: int, device: torch.device) -> None:
    """Seed torch / numpy / random and pin the kernels for a reproducible run."""
    from monai.utils.misc import set_determinism

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormal activations slow CPU kernels many times over
    set_determinism(seed=seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)


def spacing_of(meta: Mapping[str, Any]) -> tuple[float, float, float]:
    """A case's (z, y, x) spacing in mm from its metadata (1 mm when absent)."""
    value = meta.get("spacing_mm")
    if isinstance(value, list) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return (1.0, 1.0, 1.0)


def state_dict_bytes(net: torch.nn.Module) -> bytes:
    """The network's ``state_dict`` serialised by ``torch.save`` (CPU tensors)."""
    state = {k: v.detach().to("cpu") for k, v in sorted(net.state_dict().items())}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_models(models: Path) -> tuple[torch.nn.Module, LogisticModel, dict[str, Any]]:
    """Load a models folder: the network (CPU, eval mode), the classifier, ``model.json``."""
    import json

    models = Path(models)
    paths = [models / name for name in (MODEL_FILE, SEG_FILE, CLASSIFIER_FILE)]
    for path in paths:
        if not path.is_file():
            msg = f"{path}: missing (run `ctcurate train` first)"
            raise InputError(msg)
    try:
        card: dict[str, Any] = json.loads(paths[0].read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = f"{paths[0]}: not valid JSON"
        raise InputError(msg) from exc
    if card.get("format") != MODEL_FORMAT or card.get("format_version") != MODEL_FORMAT_VERSION:
        msg = f"{paths[0]}: not a {MODEL_FORMAT} v{MODEL_FORMAT_VERSION} model card"
        raise InputError(msg)
    arch = {k: v for k, v in card["architecture"].items() if k != "name"}
    net = build_unet(arch)
    try:
        state = torch.load(paths[1], map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        msg = f"{paths[1]}: cannot load the network weights ({type(exc).__name__})"
        raise InputError(msg) from exc
    net.eval()
    try:
        classifier = LogisticModel.from_json(json.loads(paths[2].read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        msg = f"{paths[2]}: not a valid classifier ({exc})"
        raise InputError(msg) from exc
    return net, classifier, card
