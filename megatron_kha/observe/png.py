"""Minimal RGB PNG encoding and atomic file writes (zlib + struct only: no plotting dependency)."""
import os
import struct
import tempfile
import zlib
from typing import Dict, Sequence

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_rgb_png(rows: Sequence[bytes], width: int, text: Dict[str, str] = None) -> bytes:
    """rows: `height` byte strings of width*3 RGB bytes each (top row first); text: tEXt chunks."""
    if not rows or any(len(r) != 3 * width for r in rows):
        raise ValueError("encode_rgb_png needs non-empty rows of width * 3 bytes")
    png = PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, len(rows), 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        png += _chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
    raw = b"".join(b"\x00" + bytes(r) for r in rows)  # filter type 0 on every row
    return png + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
