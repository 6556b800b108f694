"""A judge for shapes-world images: what is drawn where, read back from pixels or from tokens.

A shapes-world scene is a background and up to one shape per quadrant, so a picture can be
graded object by object instead of by a similarity score:

- `read_pixels(image)` reads the background colour (the frame and the centre cross, where no
  shape is ever drawn), then for each quadrant whether a shape is there, its colour (nearest
  palette colour of the pixels that stand out from the background) and its kind, from which
  corners of its box it fills: a square fills all four, a triangle only the bottom two, a
  circle none. Renders of known scenes read back exactly, at any size from 32 px.
- `TokenJudge(encode)` reads the same from visual tokens, by nearest neighbour: every possible
  quadrant content (empty, or one of 6 colours x 3 shapes) is rendered alone on each
  background and encoded with the encoder the tokens came from; a token array's background is
  the one whose candidates match it best overall, each quadrant's content the candidate whose
  tokens of that quadrant are nearest.
- `score(readings, scenes)` grades readings against the true scenes: background accuracy,
  colour at position and shape per true object, exact scene (background and all four
  quadrants right, empty ones included); `chance()` gives the same metrics for a reading drawn
  uniformly at random, the level random pixels or tokens reach.

The understanding side is graded by `question_type`: exact match per kind of question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from vpit.shapes import BACKGROUNDS, COLORS, QUADRANTS, SHAPES, Scene, render

__all__ = [
    "METRICS",
    "QUESTION_TYPES",
    "Reading",
    "TokenJudge",
    "chance",
    "question_type",
    "read_pixels",
    "score",
]

METRICS = ("background", "colour_at_position", "shape", "exact_scene")
QUESTION_TYPES = ("count", "background", "shape", "position", "colour")
_BG = {k: np.array(v, np.float32) for k, v in BACKGROUNDS.items()}
_FG = {k: np.array(v, np.float32) for k, v in COLORS.items()}


@dataclasses.dataclass(frozen=True)
class Reading:
    """What a judge read: the background and, per quadrant, (shape, colour) or None (empty)."""

    background: str
    quadrants: dict[str, tuple[str, str] | None]

    @classmethod
    def of(cls, scene: Scene) -> Reading:
        """The reading a perfect judge makes of `scene`."""
        content = {q: (s, c) for s, c, q in scene.shapes}
        return cls(scene.background, {q: content.get(q) for q in QUADRANTS})


def _nearest(colour: np.ndarray, palette: dict[str, np.ndarray]) -> str:
    return min(palette, key=lambda k: float(np.sum((palette[k] - colour) ** 2)))


def _box(quadrant: str, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the box a shape of `quadrant` is drawn in (as `shapes.render` draws it)."""
    half, pad = size // 2, max(2, size // 16)
    x0 = half if "right" in quadrant else 0
    y0 = half if "bottom" in quadrant else 0
    return x0 + pad, y0 + pad, x0 + half - pad, y0 + half - pad


def read_pixels(image) -> Reading:
    """Read a (H, W, 3) uint8 image (or a PIL image) of a shapes-world scene."""
    px = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)[..., :3]
    size = px.shape[0]
    half, pad = size // 2, max(2, size // 16)
    edge = max(1, pad // 2)
    frame = np.concatenate(
        [
            px[:edge].reshape(-1, 3),
            px[-edge:].reshape(-1, 3),
            px[:, :edge].reshape(-1, 3),
            px[:, -edge:].reshape(-1, 3),
            px[half - edge : half + edge].reshape(-1, 3),
            px[:, half - edge : half + edge].reshape(-1, 3),
        ]
    )
    background = _nearest(np.median(frame, axis=0), _BG)
    bg = _BG[background]
    quadrants: dict[str, tuple[str, str] | None] = {}
    for q in QUADRANTS:
        x0, y0, x1, y1 = _box(q, size)
        box = px[y0:y1, x0:x1]
        far = np.linalg.norm(box - bg, axis=-1) > 60  # clearly not background
        if far.mean() < 0.2:
            quadrants[q] = None
            continue
        colour = _nearest(np.median(box[far], axis=0), _FG)
        # a pixel belongs to the shape when it is nearer the shape's colour than the background's
        fill = np.linalg.norm(box - _FG[colour], axis=-1) < np.linalg.norm(box - bg, axis=-1)
        k = max(1, fill.shape[0] // 5)
        top = (fill[:k, :k].mean() + fill[:k, -k:].mean()) / 2
        bottom = (fill[-k:, :k].mean() + fill[-k:, -k:].mean()) / 2
        shape = "square" if top > 0.5 else "triangle" if bottom > 0.5 else "circle"
        quadrants[q] = (shape, colour)
    return Reading(background, quadrants)


class TokenJudge:
    """Reads scenes from visual tokens by nearest neighbour among rendered candidates.

    Args:
        encode: PIL images -> (n, m, d) tokens, the encoder the judged tokens come from.
        size: the side the candidates are rendered at (the size the encoder's images had).
    """

    def __init__(self, encode: Callable[[list], np.ndarray], size: int = 64):
        self.contents: list[tuple[str, str] | None] = [None] + [(s, c) for c in COLORS for s in SHAPES]
        images, keys = [], []
        for bg in BACKGROUNDS:
            for q in QUADRANTS:
                for content in self.contents:
                    shapes = () if content is None else ((content[0], content[1], q),)
                    images.append(render(Scene(bg, shapes), size))
                    keys.append((bg, q, content))
        tokens = np.asarray(encode(images), dtype=np.float32)
        self.m = tokens.shape[1]
        side = int(round(self.m**0.5))
        if side * side != self.m:
            raise ValueError(f"the token judge needs a square token grid, got m={self.m}")
        rows, cols = np.divmod(np.arange(self.m), side)
        self.cells = {
            q: np.flatnonzero(((rows >= side / 2) == ("bottom" in q)) & ((cols >= side / 2) == ("right" in q)))
            for q in QUADRANTS
        }
        tokens = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        # bank[bg][q]: (contents, cells, d) the candidates' tokens of quadrant q
        self.bank = {
            bg: {
                q: np.stack([tokens[i][self.cells[q]] for i, k in enumerate(keys) if k[0] == bg and k[1] == q])
                for q in QUADRANTS
            }
            for bg in BACKGROUNDS
        }

    def read(self, tokens: np.ndarray) -> Reading:
        t = np.asarray(tokens, dtype=np.float32)
        t = t / np.linalg.norm(t, axis=-1, keepdims=True)
        best: tuple[float, str, dict] | None = None
        for bg, per_q in self.bank.items():
            total, picks = 0.0, {}
            for q, cands in per_q.items():
                sims = np.einsum("ncd,cd->n", cands, t[self.cells[q]]) / len(self.cells[q])
                k = int(np.argmax(sims))
                total += float(sims[k])
                picks[q] = self.contents[k]
            if best is None or total > best[0]:
                best = (total, bg, picks)
        return Reading(best[1], best[2])


def score(readings: Sequence[Reading], scenes: Sequence[Scene]) -> dict[str, float]:
    """Accuracies of `readings` against the true `scenes` (see the module docstring)."""
    if len(readings) != len(scenes) or not scenes:
        raise ValueError(f"need one reading per scene, got {len(readings)} readings for {len(scenes)} scenes")
    bg = colour = shape = exact = objects = 0
    for r, s in zip(readings, scenes, strict=True):
        truth = Reading.of(s)
        bg += r.background == truth.background
        for q, content in truth.quadrants.items():
            if content is None:
                continue
            objects += 1
            got = r.quadrants.get(q)
            colour += got is not None and got[1] == content[1]
            shape += got is not None and got[0] == content[0]
        exact += r == truth
    n = len(scenes)
    return {
        "background": bg / n,
        "colour_at_position": colour / max(1, objects),
        "shape": shape / max(1, objects),
        "exact_scene": exact / n,
    }


def chance() -> dict[str, float]:
    """The metrics of a reading drawn uniformly at random (background one of 3, each quadrant one
    of 19 contents: empty or 6 colours x 3 shapes): what random pixels or tokens score."""
    n = 1 + len(COLORS) * len(SHAPES)
    return {
        "background": 1 / len(BACKGROUNDS),
        "colour_at_position": len(SHAPES) / n,
        "shape": len(COLORS) / n,
        "exact_scene": 1 / len(BACKGROUNDS) / n ** len(QUADRANTS),
    }


def question_type(question: str) -> str | None:
    """The kind of a shapes-world question (`shapes.questions` asks five kinds), or None."""
    q = question.strip()
    if q.startswith("How many shapes"):
        return "count"
    if q.startswith("What color is the background"):
        return "background"
    if q.startswith("What shape is"):
        return "shape"
    if q.startswith("Where is the"):
        return "position"
    if q.startswith("What color is the"):
        return "colour"
    return None
