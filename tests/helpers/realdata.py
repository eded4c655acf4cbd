"""Where the real chest CT lives (../shared/realct beside the repository)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Real chest CT (../shared/realct beside the repository, or shared/ inside a checkout).
REALCT = next(
    (p for p in (ROOT.parent / "shared" / "realct", ROOT / "shared" / "realct") if p.is_dir()),
    ROOT.parent / "shared" / "realct",
)

TCIA = REALCT / "tcia-lung-pet-ct-dx"
