"""Demo stage 9: images from prompts the model never saw, beside the true image.

An unseen prompt is the caption of a shapes-world scene whose picture is none of the
training images (compared by pixels, with a tolerance for the JPEG ones) and whose caption
is in no training text. For each: the trained VPiT model generates m visual tokens
(`Generate an image of ...`, the image forced as the answer's start, as `vpit eval` does),
the diffusion decoder turns them into pixels, and shapes_world renders the scene itself.
A third column decodes the true image's own tokens (the tiny SigLIP the cache was made
with): what a perfect VPiT model would get from this decoder. Two numbers say how far the
generated tokens are from the truth: their cosine to the prompt's own true tokens against
their cosine to the other prompts' true tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["gallery_stage", "unseen_scenes"]

PROMPT = "Generate an image of {caption}"
DIFF_TOLERANCE = 12.0  # mean |pixel difference| (0-255) under which two renders are the same scene (JPEG noise)


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


def gallery_stage(out: str | Path, n: int = 6, decoder_steps: int = 25) -> dict[str, Any]:
    """Generate, decode and save the gallery under OUT/gallery; return its rows and scores."""
    from tqdm import tqdm

    from vpit.decoder.model import decode_tokens
    from vpit.mixtures import load_spec
    from vpit.model.encoder import EncoderConfig, load_encoder
    from vpit.model.generate import encode_prompt, generate
    from vpit.shapes import caption, render
    from vpit.train.export import load_any

    out = Path(out)
    folder = out / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    scenes = unseen_scenes(out, n)
    model, tok = load_any(out / "train" / "export")
    encoder = load_encoder(EncoderConfig(encoder="tiny"))
    cache = load_spec(out / "mixtures" / "demo.yaml").cache
    if encoder.fingerprint() != cache:  # the true tokens must come from the encoder the model learned from
        raise RuntimeError(f"the demo's token cache {cache} is not the tiny SigLIP's {encoder.fingerprint()}")
    generated, truth, rows = [], [], []
    for i, scene in enumerate(tqdm(scenes, desc="generate", unit="prompt")):
        prompt = PROMPT.format(caption=caption(scene))
        ids, vis = encode_prompt(model, tok, [{"role": "user", "content": [{"text": prompt}]}])
        gen = generate(model, ids, vis, max_new_tokens=model.config.num_visual_tokens + 2, force_image=True)
        generated.append(gen.images[0])
        true_png = folder / f"{i:02d}-true.png"
        render(scene, 64).save(true_png)
        truth.append(encoder.encode([render(scene, 64)])[0])
        np.save(folder / f"{i:02d}-generated.npy", gen.images[0])
        rows.append({"prompt": prompt, "true": str(true_png)})
    gen_arr, true_arr = np.stack(generated), np.stack(truth).astype(np.float32)
    decoded = decode_tokens(out / "decoder", np.concatenate([gen_arr, true_arr]), steps=decoder_steps)
    for i, row in enumerate(rows):
        row["generated"] = str(folder / f"{i:02d}-generated.png")
        row["from_true_tokens"] = str(folder / f"{i:02d}-from-true-tokens.png")
        decoded[i].save(row["generated"])
        decoded[n + i].save(row["from_true_tokens"])
        others = [j for j in range(n) if j != i]
        row["cos_own"] = _cosine(gen_arr[i], true_arr[i])
        row["cos_others"] = (
            float(np.mean([_cosine(gen_arr[i], true_arr[j]) for j in others])) if others else float("nan")
        )
    scores = {
        "prompts": n,
        "cos_own": float(np.mean([r["cos_own"] for r in rows])),
        "cos_others": float(np.mean([r["cos_others"] for r in rows])),
        "closer_to_own": int(sum(r["cos_own"] > r["cos_others"] for r in rows)),
    }
    (folder / "gallery.json").write_text(json.dumps({"scores": scores, "rows": rows}, indent=1) + "\n")
    for r in rows:
        print(f"    {r['prompt'][:88]:<88}  cos own {r['cos_own']:.3f}  others {r['cos_others']:.3f}")
    print(
        f"    generated tokens vs the true image's tokens: cosine {scores['cos_own']:.3f} to their own prompt's, "
        f"{scores['cos_others']:.3f} to the other prompts' ({scores['closer_to_own']}/{n} closer to their own)"
    )
    print(f"    wrote {folder}/ (NN-true.png, NN-generated.png, NN-from-true-tokens.png, gallery.json)")
    return {"rows": rows, "scores": scores}
