"""Synthetic pictures with known answers, for teaching a small model to look: one coloured
shape (circle, square, triangle) or one coloured digit (0-9, rendered with Pillow's font) on a
light background, at a random size, position and shade."""
from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple(str(d) for d in range(10))


@dataclass
class Picture:
    image: object          # PIL RGB image
    kind: str              # "shape" | "digit"
    what: str              # the shape's name or the digit
    colour: str

    def questions(self) -> list[tuple[str, str]]:
        """(question, answer) pairs this picture answers."""
        if self.kind == "shape":
            return [("What shape is in the picture?", f"A {self.what}."),
                    ("What colour is the shape?", f"{self.colour.capitalize()}.")]
        return [("What digit is in the picture?", f"{self.what}."),
                ("What colour is the digit?", f"{self.colour.capitalize()}.")]


def _jitter(rgb, rng):
    return tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb)


def make_picture(rng: random.Random, size: int = 112) -> Picture:
    from PIL import Image, ImageDraw, ImageFont

    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    colour = rng.choice(list(COLOURS))
    fill = _jitter(COLOURS[colour], rng)
    extent = rng.randint(size * 5 // 10, size * 8 // 10)
    x0 = rng.randint(2, size - extent - 2)
    y0 = rng.randint(2, size - extent - 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
        return Picture(img, "shape", shape, colour)
    digit = rng.choice(DIGITS)
    # Bold glyphs about ``extent`` tall: a digit's strokes span whole patches, as a shape does
    # (thin strokes at the font's nominal size left digits barely learnable: docs/omni.md).
    stroke = max(2, extent // 24)
    font = ImageFont.load_default(size=extent)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font, stroke_width=stroke)
    font = ImageFont.load_default(size=max(8, round(extent * extent / (bottom - top))))
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font, stroke_width=stroke)
    cx = rng.randint(0, max(0, size - (right - left)))
    cy = rng.randint(0, max(0, size - (bottom - top)))
    draw.text((cx - left, cy - top), digit, fill=fill, font=font, stroke_width=stroke, stroke_fill=fill)
    return Picture(img, "digit", digit, colour)


__all__ = ["Picture", "make_picture", "COLOURS", "SHAPES", "DIGITS"]
