"""Demo stage 9: images from prompts the model never saw, judged, beside the true image.

An unseen prompt is the caption of a shapes-world scene whose picture is none of the
training images (compared by pixels, with a tolerance for the JPEG ones) and whose caption
is in no training text. For each: the trained VPiT model generates the image's visual tokens
the way training laid a generation sample out (the prompt, then the assistant's "Here is an
image based on your request:" teacher-forced, then the image), the diffusion decoder turns
them into pixels, and the judge (`vpit.judge`) reads the decoded picture: background, and per
quadrant the colour and kind of shape. The same judge reads the generated tokens directly
(nearest rendered candidates), and the pictures the decoder makes from the true image's own
tokens: what a perfect VPiT model would get from this decoder, the ceiling of the pixel
numbers. Every metric is printed beside its chance level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vpit.train.export import load_any

__all__ = ["gallery_stage", "unseen_scenes"]

PROMPT = "Generate an image of {caption}"
# Mean |pixel difference| (0-255) under which two renders are the same scene: above JPEG's noise (about 2),
# below one shape of difference (a triangle is 7% of the picture, about 8); a looser tolerance would call
# every two-shape scene "seen" and leave only three-shape prompts.
DIFF_TOLERANCE = 4.0


def _training_pixels(raw: Path) -> np.ndarray:
    files = sorted((raw / "llava" / "images").glob("*")) + sorted((raw / "pairs" / "www" / "img").glob("*"))
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB").resize((64, 64)), np.float32))
        except Exception:  # the bad records' garbage files are not training images
            continue
    return np.stack(arrays) if arrays else np.zeros((0, 64, 64, 3), np.float32)


def _training_text(out: Path) -> str:
    import pyarrow.parquet as pq

    text = (out / "raw" / "llava" / "data.jsonl").read_text(encoding="utf-8", errors="replace")
    return text + "\n".join(pq.read_table(out / "raw" / "pairs" / "urls.parquet").column("caption").to_pylist())


def unseen_scenes(out: Path, n: int, seed: int = 2024) -> list[Any]:
    """`n` distinct scenes whose render and caption appear nowhere in the demo's training data."""
    from vpit.shapes import caption, random_scene, render

    seen_px, seen_text = _training_pixels(out / "raw"), _training_text(out)
    rng = np.random.default_rng(seed)
    scenes, captions = [], set()
    for _ in range(1000 * n):
        scene = random_scene(rng)
        cap = caption(scene)
        if cap in captions or cap in seen_text:
            continue
        px = np.asarray(render(scene, 64), np.float32)
        if len(seen_px) and np.abs(seen_px - px).mean(axis=(1, 2, 3)).min() < DIFF_TOLERANCE:
            continue
        scenes.append(scene)
        captions.add(cap)
        if len(scenes) == n:
            return scenes
    raise RuntimeError(f"found only {len(scenes)} unseen scenes of {n}")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=-1)))


def _verdict(reading: Any, scene: Any) -> str:
    """One line: what the judge read against what the prompt asked, object by object."""
    from vpit.judge import Reading

    truth = Reading.of(scene)
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    parts = [f"background {reading.background} {mark(reading.background == truth.background)}"]
    for q, want in truth.quadrants.items():
        got = reading.quadrants.get(q)
        if want is None:
            if got is not None:
                parts.append(f"{q}: {got[1]} {got[0]} (none asked) ✗")
            continue
        said = "nothing" if got is None else f"{got[1]} {got[0]}"
        parts.append(f"{q}: {said} {mark(got == want)}")
    return "; ".join(parts)


def gallery_stage(out: str | Path, n: int = 6, judged: int = 48, decoder_steps: int = 25) -> dict[str, Any]:
    """Generate, decode and judge `judged` unseen prompts, show the first `n` under OUT/gallery;
    return its rows and scores (the judge's, beside chance)."""
    from tqdm import tqdm

    from vpit.decoder.model import decode_tokens
    from vpit.demo.recipe import DEMO_ENCODER
    from vpit.judge import TokenJudge, chance, read_pixels, score
    from vpit.mixtures import load_spec
    from vpit.model.encoder import load_encoder
    from vpit.model.generate import encode_for_image, generate
    from vpit.pipelines.templates import load_templates
    from vpit.shapes import caption, render

    out = Path(out)
    folder = out / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    scenes = unseen_scenes(out, max(n, judged))
    model, tok = load_any(out / "train" / "export")
    encoder = load_encoder(DEMO_ENCODER)
    cache = load_spec(out / "mixtures" / "demo.yaml").cache
    if encoder.fingerprint() != cache:  # the true tokens must come from the encoder the model learned from
        raise RuntimeError(f"the demo's token cache {cache} is not the tiny SigLIP's {encoder.fingerprint()}")
    prefix = load_templates().assistant("generation")
    generated, truth = [], []
    for scene in tqdm(scenes, desc="generate", unit="prompt"):
        messages = [
            {"role": "user", "content": [{"text": PROMPT.format(caption=caption(scene))}]},
            {"role": "assistant", "content": [{"text": prefix}, {"image": 0}]},
        ]
        ids, vis = encode_for_image(model, tok, messages, 0)
        gen = generate(model, ids, vis, max_new_tokens=model.config.num_visual_tokens + 2, force_image=True)
        generated.append(gen.images[0])
    truth = encoder.encode([render(s, 64) for s in scenes]).astype(np.float32)
    gen_arr = np.stack(generated)
    decoded = decode_tokens(out / "decoder", np.concatenate([gen_arr, truth]), steps=decoder_steps)
    k = len(scenes)
    token_judge = TokenJudge(encoder.encode)
    readings = [read_pixels(img) for img in decoded[:k]]
    scores = {
        "prompts": k,
        "judge": score(readings, scenes),
        "judge_tokens": score([token_judge.read(t) for t in gen_arr], scenes),
        "judge_true_tokens_decoded": score([read_pixels(img) for img in decoded[k:]], scenes),
        "chance": chance(),
        "cos_own": float(np.mean([_cosine(gen_arr[i], truth[i]) for i in range(k)])),
        "cos_others": float(np.mean([_cosine(gen_arr[i], truth[j]) for i in range(k) for j in range(k) if i != j])),
    }
    rows = []
    for i in range(n):
        prompt = PROMPT.format(caption=caption(scenes[i]))
        row = {"prompt": prompt, "true": str(folder / f"{i:02d}-true.png")}
        render(scenes[i], 64).save(row["true"])
        row["generated"] = str(folder / f"{i:02d}-generated.png")
        row["from_true_tokens"] = str(folder / f"{i:02d}-from-true-tokens.png")
        decoded[i].save(row["generated"])
        decoded[k + i].save(row["from_true_tokens"])
        np.save(folder / f"{i:02d}-generated.npy", gen_arr[i])
        row["verdict"] = _verdict(readings[i], scenes[i])
        row["cos_own"] = _cosine(gen_arr[i], truth[i])
        rows.append(row)
    (folder / "gallery.json").write_text(json.dumps({"scores": scores, "rows": rows}, indent=1) + "\n")
    for r in rows:
        print(f"    {r['prompt']}\n      judge: {r['verdict']}")
    base = scores["chance"]
    print(f"\n    the judge on {k} unseen prompts (chance in brackets):")
    for name, key in (
        ("decoded pixels", "judge"),
        ("generated tokens", "judge_tokens"),
        ("true tokens, decoded", "judge_true_tokens_decoded"),
    ):
        print(
            f"      {name:<22}"
            + "  ".join(f"{m.replace('_', ' ')} {v:.0%} ({base[m]:.0%})" for m, v in scores[key].items())
        )
    print(f"    wrote {folder}/ (NN-true.png, NN-generated.png, NN-from-true-tokens.png, gallery.json)")
    return {"rows": rows, "scores": scores}
