"""Opening one archive file: plain DICOM, or a gzip-compressed instance (``.dcm.gz``).

Some archives (and public corpora) store each instance gzip-compressed. Every stage that
reads an archive file goes through this module, so such a file reads as the DICOM it
holds everywhere: ``index`` (both header readers), ``select``'s scorer and ``pack``.

A gzip file is recognised by its bytes, not its name: the gzip magic (``1F 8B 08``) at
offset 0 and no DICOM preamble marker (``DICM`` at offset 128), so a DICOM file whose
free-form preamble happens to start with the magic still reads as DICOM.

Decompression is capped like a Deflated transfer syntax body in ``index``: at most
``max_bytes`` of decompressed data (``index.max_file_mb``), produced in chunks of
:data:`CHUNK_BYTES`, so a gzip bomb costs at most the cap in memory and stops as soon as it
passes it (the per-file time cap of ``index`` can interrupt between chunks).
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from ctcurate.io.paths import open_regular

if TYPE_CHECKING:
    from pydicom.dataset import FileDataset

GZIP_MAGIC = b"\x1f\x8b\x08"
#: Decompressed bytes produced per step.
CHUNK_BYTES = 1 << 20
#: Decompression cap of the stages after ``index`` (the default of ``index.max_file_mb``:
#: a file ``index`` accepted inflates to less).
DEFAULT_MAX_BYTES = 2048 * 2**20


class InflateError(ValueError):
    """A gzip file that does not decompress (``truncated``) or passes the cap (``too_large``).

    The message names the problem, never the content.
    """

    def __init__(self, detail: str, *, reason: Literal["truncated", "too_large"]) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def is_gzip(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file, 132 or more when there are) is gzip."""
    return head[:3] == GZIP_MAGIC and head[128:132] != b"DICM"


def inflate(fp: BinaryIO, max_bytes: int) -> bytes:
    """The decompressed content of the gzip stream ``fp`` (positioned at its start).

    Concatenated gzip members are read as one stream (as ``gzip`` does). Raises
    :class:`InflateError` when the stream is corrupt or ends early (``truncated``) or
    holds more than ``max_bytes`` (``too_large``, as soon as the cap is passed).
    """
    out = io.BytesIO()
    try:
        with gzip.GzipFile(fileobj=fp, mode="rb") as gz:
            while True:
                chunk = gz.read(min(CHUNK_BYTES, max_bytes + 1 - out.tell()))
                if not chunk:
                    break
                out.write(chunk)
                if out.tell() > max_bytes:
                    msg = f"gzip content inflates past the {max_bytes} byte cap (max_file_mb)"
                    raise InflateError(msg, reason="too_large")
    except (EOFError, gzip.BadGzipFile, zlib.error):
        msg = "gzip stream is corrupt or ends early"
        raise InflateError(msg, reason="truncated") from None
    return out.getvalue()


def open_instance(path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> BinaryIO:
    """A readable binary stream of the DICOM bytes of ``path`` (decompressed if gzip).

    Only a regular file is opened (:func:`ctcurate.io.paths.open_regular`: no symbolic
    link followed, no wait on a FIFO). The caller closes it. Raises ``OSError`` when the
    file cannot be read or is not a regular file, and
    :class:`InflateError` for a gzip file that does not decompress under ``max_bytes``.
    """
    raw = open_regular(path)  # never a FIFO, device or symbolic link
    keep = False
    try:
        head = raw.read(132)
        raw.seek(0)
        if not is_gzip(head):
            keep = True
            return raw
        return io.BytesIO(inflate(raw, max_bytes))
    finally:
        if not keep:
            raw.close()


def dcmread(path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES, **kwargs: Any) -> FileDataset:
    """``pydicom.dcmread`` of an archive file, gzip-compressed or not (``kwargs`` pass on).

    Raises what ``pydicom.dcmread`` raises, and :class:`InflateError` (a ``ValueError``).
    """
    import pydicom

    with open_instance(path, max_bytes) as fp:
        return pydicom.dcmread(fp, **kwargs)
