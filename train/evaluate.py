"""Evaluation on held-out samples: understanding (answers, per-source text loss) and
generation (visual tokens against their cached targets).

Items are mixture items (record + cached tokens) that the mixture never trains on (the
spec's held-out split). Understanding: the prompt is every turn before the first assistant
turn, the answer is that turn's text; greedy decoding, exact match after normalisation, and
multiple-choice accuracy for records that carry `choices` and `answer_index`. Generation:
the prompt is the user turn; the model is asked for one image; its m tokens are compared
with the target's cached tokens (cosine, retrieval among candidates, Fréchet distance).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpit.errors import ConfigError
from vpit.model.chat_template import ImageTokens, get_template, stop_ids
from vpit.model.generate import encode_prompt, generate
from vpit.records import Message, Record, StreamItem
from vpit.train.collate import Collator
from vpit.train.metrics import (
    exact_match,
    frechet_distance,
    mean_token_cosine,
    multiple_choice_correct,
    retrieval_accuracy,
)

__all__ = ["evaluate_items", "evaluate_run", "split_prompt", "write_eval"]

UNDERSTANDING_KINDS = ("understanding", "text", "video")


def split_prompt(record: Record) -> tuple[list[Message], Message] | None:
    """(turns before the first assistant turn, that assistant turn), or None if there is none."""
    for i, msg in enumerate(record["messages"]):
        if msg["role"] == "assistant":
            return record["messages"][:i], msg
    return None


def _answer_text(msg: Message) -> str:
    return " ".join(p["text"] for p in msg["content"] if "text" in p)


def _target_image(msg: Message) -> int | None:
    images = [p["image"] for p in msg["content"] if "image" in p]
    return images[0] if images else None


@torch.no_grad()
def evaluate_items(
    model,
    tokenizer,
    items: list[StreamItem],
    suite: tuple[str, ...] = ("understanding", "generation"),
    max_new_tokens: int = 16,
    n_candidates: int = 16,
    max_len: int = 1024,
) -> dict[str, Any]:
    """Metrics over held-out `items`: a flat dict of `understanding/...` and `generation/...` keys."""
    model.eval()
    cfg = model.config
    stop = stop_ids(tokenizer, get_template(cfg.chat_template))
    collate = Collator(
        tokenizer,
        get_template(cfg.chat_template),
        ImageTokens(cfg.image_start_id, cfg.image_end_id, cfg.num_visual_tokens),
        cfg.vision_dim,
        max_len,
    )
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "understanding" in suite:
        em, mc, losses = [], [], defaultdict(list)
        for item in items:
            rec = item["record"]
            if rec["kind"] not in UNDERSTANDING_KINDS or (parts := split_prompt(rec)) is None:
                continue
            batch = collate([item])
            if batch.sample_ids:
                losses[item["source"]].append(float(model(**batch.model_inputs()).text_loss))
            prompt, answer = parts
            ids, vis = encode_prompt(model, tokenizer, prompt, item["tokens"])
            gen = generate(model, ids, vis, max_new_tokens=max_new_tokens, stop_ids=stop)
            text = tokenizer.decode([t for t in gen.token_ids if t >= 0 and t not in stop], skip_special_tokens=True)
            if "choices" in rec and "answer_index" in rec:
                mc.append(multiple_choice_correct(text, rec["choices"], rec["answer_index"]))
            else:
                em.append(exact_match(text, _answer_text(answer)))
        if em:
            out["understanding/exact_match"] = float(np.mean(em))
        if mc:
            out["understanding/mc_accuracy"] = float(np.mean(mc))
        for source, vals in sorted(losses.items()):
            out[f"understanding/text_loss/{source}"] = float(np.mean(vals))
        out["n_understanding"] = len(em) + len(mc)
    if "generation" in suite:
        generated, targets = [], []
        for item in items:
            rec = item["record"]
            parts = split_prompt(rec)
            if rec["kind"] != "generation" or parts is None or (target := _target_image(parts[1])) is None:
                continue
            ids, vis = encode_prompt(model, tokenizer, parts[0], item["tokens"])
            gen = generate(model, ids, vis, max_new_tokens=cfg.num_visual_tokens + 2, force_image=True)
            generated.append(gen.images[0])
            targets.append(np.asarray(item["tokens"][target], np.float32))
        if generated:
            g, t = np.stack(generated), np.stack(targets)
            out["generation/cosine"] = mean_token_cosine(g, t)
            out["generation/retrieval"] = retrieval_accuracy(g, t, n_candidates=min(n_candidates, len(g)))
            if len(g) > 2:
                out["generation/frechet"] = frechet_distance(g, t)
        out["n_generation"] = len(generated)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def write_eval(run_dir: str | Path, step: int, metrics: dict[str, Any]) -> Path:
    """One JSON per evaluation: RUN/eval/step-000123.json."""
    path = Path(run_dir) / "eval" / f"step-{step:06d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, **metrics}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def evaluate_run(
    run: str | Path,
    suite: tuple[str, ...] = ("understanding", "generation"),
    max_per_source: int = 64,
    step: int | None = None,
) -> dict[str, Any]:
    """Evaluate a training run (or one of its checkpoints) on its mixture's held-out split.

    Writes RUN/eval/step-N.json and returns the metrics.
    """
    import yaml

    from vpit.mixtures import heldout_items, load_spec
    from vpit.train.checkpoint import ResumeState
    from vpit.train.export import load_checkpoint_model, resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    run_dir = ckpt.parent.parent
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    if not cfg["data"].get("mixture"):
        raise ConfigError(f"{run_dir}: trained on synthetic data, which has no held-out split to evaluate on")
    spec = load_spec(cfg["data"]["mixture"], cfg["data"].get("mixture_overrides") or None)
    items = heldout_items(spec, max_per_source=max_per_source)
    model, tokenizer = load_checkpoint_model(ckpt)
    metrics = evaluate_items(model, tokenizer, items, suite=suite, max_len=cfg["data"].get("max_len", 1024))
    if step is None:
        step = ResumeState.from_dict(json.loads((ckpt / "vpit_state.json").read_text())).step
    write_eval(run_dir, step, metrics)
    return metrics
