"""Shapes world: the small toy world whose images and texts can be checked, not noise.

A scene is 1-3 coloured shapes (circle, square, triangle), each in a quadrant of a plain
background. Every question has one right answer that can be read off the scene, and every
caption names exactly what is drawn, so a trained model can be judged on it. Everything is
a pure function of a seed. The synthetic training items, the demo's raw corpora
(`vpit.demo.corpora`), the tests and the benchmarks all draw from here.
"""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "QUADRANTS",
    "SHAPES",
    "Scene",
    "caption",
    "encode_image",
    "parse_caption",
    "questions",
    "random_edit",
    "random_scene",
    "render",
]

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[tuple[str, str, str], ...]  # (shape, colour, quadrant)


def random_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    n = int(rng.integers(1, max_shapes + 1))
    quadrants = rng.permutation(len(QUADRANTS))[:n]
    colors = rng.permutation(len(COLORS))[:n]  # distinct colours: every question has one answer
    names = list(COLORS)
    shapes = tuple(
        (SHAPES[int(rng.integers(len(SHAPES)))], names[int(c)], QUADRANTS[int(q)]) for c, q in zip(colors, quadrants)
    )
    return Scene(background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))], shapes=shapes)


def render(scene: Scene, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    half = size // 2
    pad = max(2, size // 16)
    for shape, color, quadrant in scene.shapes:
        x0 = half if "right" in quadrant else 0
        y0 = half if "bottom" in quadrant else 0
        box = (x0 + pad, y0 + pad, x0 + half - pad, y0 + half - pad)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[color])
    return img


def encode_image(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def caption(scene: Scene) -> str:
    things = [f"a {color} {shape} in the {quadrant}" for shape, color, quadrant in scene.shapes]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    return f"{listed} on a {scene.background} background"


_THING = re.compile(r"^a (\w+) (circle|square|triangle) in the (top left|top right|bottom left|bottom right)$")


def parse_caption(text: str) -> Scene | None:
    """The scene a `caption` describes, or None for any other text (the inverse of `caption`)."""
    listed, sep, background = text.strip().rpartition(" on a ")
    background = background.removesuffix(" background")
    if not sep or background not in BACKGROUNDS:
        return None
    head, _, last = listed.rpartition(" and ")
    parts = [p for p in head.split(", ") if p] + [last] if head else [listed]
    shapes = []
    for part in parts:
        m = _THING.match(part)
        if m is None or m.group(1) not in COLORS:
            return None
        shapes.append((m.group(2), m.group(1), m.group(3)))
    if len({q for _, _, q in shapes}) != len(shapes):
        return None
    return Scene(background=background, shapes=tuple(shapes))


def questions(scene: Scene) -> list[tuple[str, str]]:
    """All (question, answer) pairs with a single right answer for this scene."""
    qa = [("How many shapes are there?", str(len(scene.shapes))), ("What color is the background?", scene.background)]
    kinds = [s for s, _, _ in scene.shapes]
    for shape, color, quadrant in scene.shapes:
        qa.append((f"What shape is {color}?", shape))
        qa.append((f"Where is the {color} {shape}?", quadrant))
        if kinds.count(shape) == 1:
            qa.append((f"What color is the {shape}?", color))
    return qa


def random_edit(rng: np.random.Generator, scene: Scene) -> tuple[str, Scene]:
    """A recolour or a move of one shape of `scene`, as (instruction, edited scene)."""
    k = int(rng.integers(len(scene.shapes)))
    shape, color, quadrant = scene.shapes[k]
    if rng.random() < 0.5:
        free = [c for c in COLORS if c not in {s[1] for s in scene.shapes}]
        new = free[int(rng.integers(len(free)))]
        edited = (shape, new, quadrant)
        instruction = f"make the {color} {shape} {new}"
    else:
        free = [q for q in QUADRANTS if q not in {s[2] for s in scene.shapes}]
        new = free[int(rng.integers(len(free)))]
        edited = (shape, color, new)
        instruction = f"move the {color} {shape} to the {new}"
    shapes = tuple(edited if j == k else s for j, s in enumerate(scene.shapes))
    return instruction, Scene(scene.background, shapes)
