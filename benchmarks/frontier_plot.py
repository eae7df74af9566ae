"""A scatter plot of fidelity against file size, drawn with Pillow (already a dependency),
one colour per tool, each point labelled with its bit width and method."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"onnxruntime": (214, 96, 39), "onnxcomp": (44, 110, 190), "onnxcomp .onnxc": (36, 150, 70)}
WIDTH, HEIGHT, MARGIN = 1400, 900, 90


def draw_frontier(entries, path: Path, title: str) -> None:
    """`entries` have .tool, .method, .bits, .size (bytes) and .cosine."""
    sizes = [e.size / 1e6 for e in entries]
    floor = max(0.0, 1.0 - 1.1 * (1.0 - min(e.cosine for e in entries)))
    x_low, x_high = math.log10(min(sizes)) - 0.05, math.log10(max(sizes)) + 0.05

    def point(size_mb: float, cosine: float) -> tuple[float, float]:
        x = MARGIN + (math.log10(size_mb) - x_low) / (x_high - x_low) * (WIDTH - 2 * MARGIN)
        y = HEIGHT - MARGIN - (max(cosine, floor) - floor) / (1.0 - floor) * (HEIGHT - 2 * MARGIN)
        return x, y

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN, 20), title, fill="black", font=font)
    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    for tick in range(11):  # cosine axis
        cosine = floor + (1.0 - floor) * tick / 10
        _, y = point(10**x_low, cosine)
        draw.line([MARGIN - 5, y, WIDTH - MARGIN, y], fill=(225, 225, 225))
        draw.text((10, y - 6), f"{cosine:.4f}", fill="black", font=font)
    for exponent in range(math.floor(x_low), math.ceil(x_high) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**exponent
            if x_low <= math.log10(value) <= x_high:
                x, _ = point(value, floor)
                draw.line([x, MARGIN, x, HEIGHT - MARGIN + 5], fill=(225, 225, 225))
                draw.text((x - 10, HEIGHT - MARGIN + 10), f"{value:g}", fill="black", font=font)
    draw.text((WIDTH // 2 - 60, HEIGHT - 40), "file size, MB (log scale)", fill="black", font=font)
    draw.text((10, MARGIN - 30), "mean cosine to FP32", fill="black", font=font)
    for entry in entries:
        x, y = point(entry.size / 1e6, entry.cosine)
        colour = COLOURS.get(entry.tool, (120, 120, 120))
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        draw.text((x + 7, y - 6), f"{entry.bits}b {entry.method}", fill=colour, font=font)
    for i, (tool, colour) in enumerate(COLOURS.items()):
        y = MARGIN + 15 + 18 * i
        draw.ellipse([WIDTH - MARGIN - 200, y, WIDTH - MARGIN - 190, y + 10], fill=colour)
        draw.text((WIDTH - MARGIN - 182, y - 1), tool, fill="black", font=font)
    image.save(path)
