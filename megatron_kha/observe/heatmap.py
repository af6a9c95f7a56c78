"""Heatmap PNGs of the head-mixing matrices, written with zlib + struct only (no matplotlib).

write_heatmap_png(matrix, path, title=None, vmax=None, cell_px=None)
    RGB PNG, one cell_px x cell_px block per matrix entry (row 0 at the top). Diverging
    colormap centred on 0: blue (negative) - white (0) - red (positive), saturating at
    +-vmax (default: max |entry|). NaN/inf cells are grey. The title and colour range go
    into PNG tEXt chunks ("Title", "Comment"). Written to a temp file, then renamed.
write_model_heatmaps(model, out_dir, step) -> [paths]
    One PNG per knocking / composition matrix: "{out_dir}/layer3_knocking_v.weight_step0001000.png".
"""
import math
import os
from typing import List, Optional

from megatron_kha.observe.head_mixing_matrices import head_mixing_matrices
from megatron_kha.observe.png import atomic_write_bytes, encode_rgb_png

NEGATIVE, ZERO, POSITIVE, INVALID = (59, 76, 192), (247, 247, 247), (180, 4, 38), (128, 128, 128)


def diverging_rgb(value: float, vmax: float) -> tuple:
    """Colour of one entry: white at 0, blue at -vmax, red at +vmax (clipped beyond)."""
    if not math.isfinite(value):
        return INVALID
    t = max(-1.0, min(1.0, value / vmax)) if vmax > 0 else 0.0
    end = POSITIVE if t > 0 else NEGATIVE
    return tuple(round(z + abs(t) * (e - z)) for z, e in zip(ZERO, end))


def _as_rows(matrix) -> List[List[float]]:
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().float().cpu().tolist()
    rows = [[float(v) for v in row] for row in matrix]
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("write_heatmap_png needs a non-empty 2-D matrix")
    return rows


def encode_heatmap_png(matrix, title: Optional[str] = None, vmax: Optional[float] = None,
                       cell_px: Optional[int] = None) -> bytes:
    """The PNG file contents for `matrix` (see write_heatmap_png)."""
    rows = _as_rows(matrix)
    finite = [abs(v) for row in rows for v in row if math.isfinite(v)]
    vmax = vmax if vmax is not None else max(finite, default=0.0)
    cell = cell_px or max(1, min(8, 512 // max(len(rows), len(rows[0]))))
    rows_px = []
    for row in rows:
        line = b"".join(bytes(diverging_rgb(v, vmax)) * cell for v in row)
        rows_px += [line] * cell
    text = {"Comment": f"colour range [-{vmax:.6g}, {vmax:.6g}]"}
    if title:
        text = {"Title": title, **text}
    return encode_rgb_png(rows_px, len(rows[0]) * cell, text)


def write_heatmap_png(matrix, path: str, title: Optional[str] = None, vmax: Optional[float] = None,
                      cell_px: Optional[int] = None) -> str:
    atomic_write_bytes(path, encode_heatmap_png(matrix, title=title, vmax=vmax, cell_px=cell_px))
    return path


def write_model_heatmaps(model, out_dir: str, step: int) -> List[str]:
    """One heatmap per knocking / composition matrix of `model` (this rank's layers)."""
    paths = []
    for label, value, _ in head_mixing_matrices(model):
        path = os.path.join(out_dir, f"{label.replace('/', '_')}_step{step:07d}.png")
        paths.append(write_heatmap_png(value, path, title=f"{label} @ step {step}"))
    return paths
