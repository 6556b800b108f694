"""In-memory shapes-world items in the mixture stream's item format, with learnable tokens.

Used by tests and benchmarks that need training data without a token cache. Each item is
{"index", "id", "source", "group", "record", "tokens"} exactly as `MixtureStream` yields.
The visual tokens stand in for SigLIP features: token k of an image is a fixed random
direction for what is drawn in the image region k falls in (shape x colour, or the
background), plus noise, L2-normalised. So a caption determines its tokens up to noise and a
model can learn to generate them; a random model cannot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vpit.shapes import COLORS, SHAPES, Scene, caption, questions, random_scene

__all__ = ["scene_tokens", "synthetic_items"]

_BG = ("white", "gray", "black")


def _codebook(d: int) -> dict[Any, np.ndarray]:
    rng = np.random.default_rng(1234)
    keys = [(s, c) for s in SHAPES for c in COLORS] + list(_BG)
    return {k: rng.standard_normal(d).astype(np.float32) for k in keys}


def scene_tokens(scene: Scene, m: int, d: int, rng: np.random.Generator, noise: float = 0.3) -> np.ndarray:
    """(m, d) L2-normalised tokens: token k encodes the quadrant k falls in (a 2x2 split of an
    n x n grid of tokens, n = sqrt(m))."""
    book = _codebook(d)
    side = int(round(m**0.5))
    by_quadrant = {q: (s, c) for s, c, q in scene.shapes}
    out = np.empty((m, d), np.float32)
    for k in range(m):
        r, c = divmod(k, side) if side * side == m else (0, k)
        quadrant = ("bottom" if r >= side / 2 else "top") + " " + ("right" if c >= side / 2 else "left")
        key = by_quadrant.get(quadrant, scene.background)
        out[k] = book[key] + noise * rng.standard_normal(d).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _generation(scene: Scene) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"text": f"Generate an image of {caption(scene)}"}]},
        {"role": "assistant", "content": [{"text": "Here is an image based on your request:"}, {"image": 0}]},
    ]


def _understanding(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
    q, a = questions(scene)[int(rng.integers(len(questions(scene))))]
    return [{"role": "user", "content": [{"image": 0}, {"text": q}]}, {"role": "assistant", "content": [{"text": a}]}]


def synthetic_items(
    n: int, seed: int = 0, m: int = 16, d: int = 32, generation_share: float = 0.5, start: int = 0
) -> list[dict[str, Any]]:
    """`n` items (generation and understanding samples), a pure function of the arguments."""
    items = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        scene = random_scene(rng)
        gen = rng.random() < generation_share
        kind = "generation" if gen else "understanding"
        messages = _generation(scene) if gen else _understanding(scene, rng)
        record = {
            "id": f"synthetic:{i:06d}",
            "source": f"synthetic-{kind}",
            "kind": kind,
            "messages": messages,
            "caption": caption(scene),
        }
        items.append(
            {
                "index": i,
                "id": record["id"],
                "source": f"synthetic-{kind}",
                "group": kind,
                "record": record,
                "tokens": scene_tokens(scene, m, d, rng)[None],
            }
        )
    return items
