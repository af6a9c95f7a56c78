"""Loss curves as a PNG line plot (no plotting dependency): axes box, light grid, one colour per series.

There is no text rendering: the colour of each series is returned (and stored in a tEXt
chunk), so the caller can print the legend next to the image, e.g. in a markdown table.
"""
from typing import Dict, List, Sequence, Tuple

from megatron_kha.observe.png import atomic_write_bytes, encode_rgb_png

COLOURS = [("blue", (31, 119, 180)), ("orange", (255, 127, 14)), ("green", (44, 160, 44)),
           ("red", (214, 39, 40)), ("purple", (148, 103, 189)), ("brown", (140, 86, 75))]


def write_line_plot_png(series: Dict[str, Sequence[Tuple[float, float]]], path: str,
                        width: int = 800, height: int = 480, margin: int = 30) -> Dict[str, str]:
    """Plot each named series of (x, y) points; returns {name: colour name}."""
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("write_line_plot_png needs at least one point")
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    canvas: List[bytearray] = [bytearray(b"\xff" * width * 3) for _ in range(height)]

    def put(x: int, y: int, rgb) -> None:
        if 0 <= x < width and 0 <= y < height:
            canvas[y][3 * x: 3 * x + 3] = bytes(rgb)

    def to_px(x: float, y: float) -> Tuple[int, int]:
        px = margin + (x - x0) / (x1 - x0) * (width - 2 * margin)
        py = height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin)
        return round(px), round(py)

    for i in range(11):  # grid, then the axes box
        gx = margin + i * (width - 2 * margin) // 10
        gy = margin + i * (height - 2 * margin) // 10
        for y in range(margin, height - margin):
            put(gx, y, (225, 225, 225) if 0 < i < 10 else (0, 0, 0))
        for x in range(margin, width - margin + 1):
            put(x, gy, (225, 225, 225) if 0 < i < 10 else (0, 0, 0))
    legend = {}
    for (name, values), (colour, rgb) in zip(series.items(), COLOURS * (1 + len(series) // len(COLOURS))):
        legend[name] = colour
        pixels = [to_px(x, y) for x, y in sorted(values)]
        for (ax, ay), (bx, by) in zip(pixels, pixels[1:] or pixels):
            steps = max(abs(bx - ax), abs(by - ay), 1)
            for k in range(steps + 1):
                put(round(ax + (bx - ax) * k / steps), round(ay + (by - ay) * k / steps), rgb)
    text = {"Comment": f"x in [{x0:g}, {x1:g}], y in [{y0:g}, {y1:g}]",
            "Legend": ", ".join(f"{n}={c}" for n, c in legend.items())}
    atomic_write_bytes(path, encode_rgb_png(canvas, width, text))
    return legend
