"""Shapes world: small synthetic raw corpora that are learnable and checkable, not noise.

A scene is 1-3 coloured shapes (circle, square, triangle), each in a quadrant of a plain
background. Every question has one right answer that can be read off the scene, and every
caption names exactly what is drawn, so a trained model can be judged on it. Everything
is a pure function of a seed. The demo, the tests and the benchmarks all draw from here.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BAD_LLAVA_CASES",
    "COLORS",
    "SHAPES",
    "Scene",
    "caption",
    "encode_image",
    "questions",
    "random_scene",
    "render",
    "write_bad_llava_records",
    "write_llava_dataset",
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


def questions(scene: Scene) -> list[tuple[str, str]]:
    """All (question, answer) pairs with a single right answer for this scene."""
    qa = [("How many shapes are there?", str(len(scene.shapes))),
          ("What color is the background?", scene.background)]
    kinds = [s for s, _, _ in scene.shapes]
    for shape, color, quadrant in scene.shapes:
        qa.append((f"What shape is {color}?", shape))
        qa.append((f"Where is the {color} {shape}?", quadrant))
        if kinds.count(shape) == 1:
            qa.append((f"What color is the {shape}?", color))
    return qa


def write_llava_dataset(out: Path, n: int, seed: int = 0, size: int = 64, turns: int = 2) -> dict[str, Any]:
    """Write `n` LLaVA-format records (data.jsonl) and their images (images/) under `out`.

    Every 10th record is text-only and every 7th has two images, so all input forms occur.
    Returns {"jsonl": path, "image_root": path, "ids": [...]}.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ids, lines = [], []
    for i in range(n):
        scene = random_scene(rng)
        rec: dict[str, Any] = {"id": f"shapes-{i:06d}"}
        qa = questions(scene)
        picks = rng.permutation(len(qa))[:turns]
        conv = []
        if i % 10 == 9:  # text-only: a question about a described scene
            conv = [{"from": "human", "value": f"A picture shows {caption(scene)}. {qa[picks[0]][0]}"},
                    {"from": "gpt", "value": qa[picks[0]][1]}]
        else:
            fmt = "JPEG" if i % 2 else "PNG"
            name = f"images/{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
            (out / name).write_bytes(encode_image(render(scene, size), fmt))
            rec["image"] = name
            for t, p in enumerate(picks):
                q, a = qa[p]
                conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
            if i % 7 == 6:
                other = random_scene(rng)
                name2 = f"images/{i:06d}-b.png"
                (out / name2).write_bytes(encode_image(render(other, size)))
                rec["image"] = [name, name2]
                conv += [{"from": "human", "value": "<image>\nHow many shapes are in the second picture?"},
                         {"from": "gpt", "value": str(len(other.shapes))}]
        if i % 5 == 0:
            rec["system"] = "You are a careful assistant that answers questions about pictures."
        rec["conversations"] = conv
        lines.append(json.dumps(rec))
        ids.append(rec["id"])
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"jsonl": path, "image_root": out, "ids": ids}


# One raw record per bad case that the LLaVA ingest must quarantine, with its reason code.
BAD_LLAVA_CASES = (
    "malformed_json",
    "missing_image",
    "unreadable_image",  # garbage bytes
    "unreadable_image",  # a truncated PNG
    "image_too_large",
    "placeholder_mismatch",
    "empty_conversation",
    "one_sided_conversation",
    "unknown_role",
    "non_utf8",
    "path_escape",
)


def write_bad_llava_records(out: Path, size: int = 64, bomb_side: int = 3000) -> list[bytes]:
    """Write the images the bad cases need under `out` and return one raw JSONL line per case
    of `BAD_LLAVA_CASES`, in that order. The bomb is `bomb_side`^2 pixels (a solid PNG, a
    few kB on disk): ingest it with max_pixels below that."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    good = encode_image(render(Scene("white", (("circle", "red", "top left"),)), size))
    (out / "images/bad-garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (out / "images/bad-truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (bomb_side, bomb_side), (0, 0, 0)).save(out / "images/bad-bomb.png")
    (out / "images/bad-ok.png").write_bytes(good)
    (out.parent / "outside.png").write_bytes(good)

    def rec(i, image, conv):
        r = {"id": f"bad-{i}", "conversations": conv}
        if image is not None:
            r["image"] = image
        return json.dumps(r).encode()

    qa = [{"from": "human", "value": "<image>\nWhat shape is red?"}, {"from": "gpt", "value": "circle"}]
    return [
        b'{"id": "bad-0", "conversations": [{"from": "human", "value": "hi"',
        rec(1, "images/does-not-exist.png", qa),
        rec(2, "images/bad-garbage.jpg", qa),
        rec(3, "images/bad-truncated.png", qa),
        rec(4, "images/bad-bomb.png", qa),
        rec(5, "images/bad-ok.png", [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}]),
        rec(6, "images/bad-ok.png", [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "  "}]),
        rec(7, "images/bad-ok.png", [{"from": "human", "value": "<image>\nWhat shape is red?"}]),
        rec(8, "images/bad-ok.png", [{"from": "human", "value": "<image>\nWhat?"}, {"from": "robot", "value": "beep"}]),
        b'{"id": "bad-9", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "yes"}]}',
        rec(10, "../outside.png", qa),
    ]
