"""The demo's training stage: a small VPiT model on the demo mixture, for about two minutes on CPU.

It makes sure every demo dataset has the tiny-SigLIP token cache (precompute skips what is
done), trains a 512-token BPE tokenizer on the demo's own texts (a 150k-row vocabulary would
spend most of a CPU step on the output layer of words the shapes world never uses), writes a
training YAML a user can re-run with `vpit train`, trains with the ZeRO-3 trainer in this
process (world size 1, fp32), prints the falling losses, exports the model and generates one
image's visual tokens from a caption, the image asked for where training puts it.

The encoder, model and learning rate are the demo's recipe (`vpit.demo.recipe`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vpit.demo.recipe import DEMO_ENCODER, DEMO_LR, DEMO_MAX_LEN, DEMO_MODEL

__all__ = ["train_stage"]


def _ensure_caches(out: Path) -> Path:
    """Tiny-SigLIP caches for every demo dataset, then the demo spec again (now with a cache)."""
    from vpit.demo.mixture_stage import write_demo_spec
    from vpit.pipelines.precompute import PrecomputeConfig, run_precompute
    from vpit.pipelines.shards import load_manifest

    for folder in sorted((out / "datasets").iterdir()):
        manifest = load_manifest(folder) if folder.is_dir() else None
        if manifest and manifest.get("complete") and manifest.get("samples"):
            run_precompute(folder, DEMO_ENCODER, PrecomputeConfig(actors=1), progress=False)
    return write_demo_spec(out)


def demo_tokenizer(out: Path) -> Path:
    """OUT/tokenizer: a byte-level BPE of 512 ids trained on every text of the demo's raw corpora."""
    import json

    import pyarrow.parquet as pq

    from vpit.model.tokenizer import train_bpe_tokenizer

    folder = out / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    texts = []
    for line in (out / "raw" / "llava" / "data.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            texts += [t["value"] for t in json.loads(line).get("conversations", []) if isinstance(t.get("value"), str)]
        except (ValueError, AttributeError):
            continue
    texts += [
        f"Generate an image of {c}"
        for c in pq.read_table(out / "raw" / "pairs" / "urls.parquet").column("caption").to_pylist()
        if c
    ]
    from vpit.pipelines.templates import load_templates

    templates = load_templates()
    texts += [t for g in templates.groups.values() for t in (*g.user, g.assistant)]
    train_bpe_tokenizer(texts, vocab_size=512).save_pretrained(folder)
    return folder


def train_stage(out: str | Path, steps: int = 150, micro_batch: int = 16) -> dict:
    from vpit.mixtures import load_spec, make_plan
    from vpit.model.chat_template import get_template, stop_ids
    from vpit.model.generate import encode_for_image, generate, render_generation, save_images
    from vpit.pipelines.templates import load_templates
    from vpit.train.config import load_train_config
    from vpit.train.export import export_checkpoint, load_any
    from vpit.train.run_log import read_metrics
    from vpit.train.trainer import Trainer

    out = Path(out)
    spec_path = _ensure_caches(out)
    demo_tokenizer(out)
    plan = make_plan(load_spec(spec_path))
    # Repeat the (small) demo mixture, keeping its group ratios, so that `steps` batches exist.
    factor = math.ceil(steps * micro_batch / plan.total)
    overrides = {"repetition": "allow", **{f"groups.{g}.count": n * factor for g, n in plan.groups}}
    cfg_path = out / "train" / "demo.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by `vpit demo`; re-run with: vpit train THIS (add --resume to continue a run)",
        "output_dir: run",
        f"model: {{llm: tiny, tokenizer: ../tokenizer, chat_template: chatml, vision_dim: {plan.dim}, "
        f"num_visual_tokens: {plan.m}, " + ", ".join(f"{k}: {v}" for k, v in DEMO_MODEL.items()) + "}",
        "data:",
        f"  mixture: ../mixtures/{spec_path.name}",
        "  mixture_overrides: {" + ", ".join(f"{k}: {v}" for k, v in overrides.items()) + "}",
        f"  max_len: {DEMO_MAX_LEN}",
        "  num_workers: 1",
        f"micro_batch_size: {micro_batch}",
        f"max_steps: {steps}",
        f"lr: {DEMO_LR}",
        f"lr_reference_batch: {micro_batch}",
        "warmup_steps: 10",
        "min_lr_ratio: 0.1",
        f"save_every: {steps}",
        "",
    ]
    cfg_path.write_text("\n".join(lines), encoding="utf-8")
    print(f"    wrote {cfg_path}")
    cfg = load_train_config(cfg_path)
    summary = Trainer(cfg).train()
    rows = read_metrics(cfg.output_dir)
    print("\n    step   text loss   vision loss   tokens/s")
    for r in rows[:: max(1, len(rows) // 8)] + [rows[-1]]:
        print(f"    {r['step']:4d}   {r['text_loss']:9.3f}   {r['vision_loss']:11.3f}   {r['tokens_per_s']:8.0f}")
    print(f"    loss curve: {summary['loss_png']}")

    export = export_checkpoint(cfg.output_dir, out / "train" / "export")
    model, tok = load_any(export)
    caption = "a red circle in the top left on a white background"
    prefix = load_templates().assistant("generation")
    messages = [
        {"role": "user", "content": [{"text": f"Generate an image of {caption}"}]},
        {"role": "assistant", "content": [{"text": prefix}, {"image": 0}]},
    ]
    ids, vis = encode_for_image(model, tok, messages, 0)
    stops = stop_ids(tok, get_template(model.config.chat_template))
    gen = generate(model, ids, vis, max_new_tokens=model.config.num_visual_tokens + 8, stop_ids=stops, force_image=True)
    paths = save_images(gen, out / "train" / "generated")
    print(
        f"\n    exported to {export}\n    vpit generate {export} --image --prompt 'Generate an image of {caption}':\n"
        f"    {prefix + ' ' + render_generation(gen, tok, paths)!r}"
    )
    return {
        "first": rows[0],
        "last": rows[-1],
        "images": len(gen.images),
        "norm": float(np.linalg.norm(gen.images[0], axis=-1).mean()) if gen.images else None,
    }
