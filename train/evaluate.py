"""Evaluation on held-out samples: understanding (answers, per-source text loss) and
generation (visual tokens against their cached targets).

Items are mixture items (record + cached tokens) that the mixture never trains on (the
spec's held-out split). Understanding: the prompt is every turn before the first assistant
turn, the answer is that turn's text; greedy decoding, exact match after normalisation (per
question type too, for shapes-world questions), and multiple-choice accuracy for records
that carry `choices` and `answer_index`.

Generation follows the template: the conversation is teacher-forced exactly as training
encoded it up to the target image (the user turn, the assistant header and the assistant's
"Here is an image based on your request:"), then the image is asked for; its m tokens are
compared with the target's cached tokens (cosine, retrieval among candidates, Fréchet
distance) and, for shapes-world captions, read by the token judge (`vpit.judge`: background,
colour at position, shape, exact scene, each beside its chance level). A second, free pass
lets the model answer the bare prompt on its own for `FREE_BUDGET` tokens: how often it emits
`<image_start>` by itself is `generation/free_rate`.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpit import storage
from vpit.errors import ConfigError
from vpit.judge import chance, question_type, score
from vpit.model.chat_template import ImageTokens, get_template, stop_ids
from vpit.model.generate import encode_for_image, encode_prompt, generate
from vpit.records import Message, Record, StreamItem
from vpit.shapes import parse_caption
from vpit.train.collate import Collator
from vpit.train.metrics import (
    exact_match,
    frechet_distance,
    mean_token_cosine,
    multiple_choice_correct,
    retrieval_accuracy,
)

__all__ = [
    "evaluate_items",
    "evaluate_run",
    "evaluate_sharded",
    "heldout_for",
    "judge_for",
    "score_items",
    "split_prompt",
    "summarize",
    "write_eval",
]

UNDERSTANDING_KINDS = ("understanding", "text", "video")
FREE_BUDGET = 16  # tokens the model may take, answering a generation prompt freely, before <image_start>


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


def _tasks(items: list[StreamItem], suite: tuple[str, ...]) -> tuple[list[StreamItem], list[StreamItem]]:
    """(understanding items with an answer, generation items with a target image), in order."""
    und = [
        it
        for it in items
        if "understanding" in suite
        and it["record"]["kind"] in UNDERSTANDING_KINDS
        and split_prompt(it["record"]) is not None
    ]
    gen = [
        it
        for it in items
        if "generation" in suite
        and it["record"]["kind"] == "generation"
        and (parts := split_prompt(it["record"])) is not None
        and _target_image(parts[1]) is not None
    ]
    return und, gen


@torch.no_grad()
def score_items(
    model,
    tokenizer,
    und: list[StreamItem],
    gen: list[StreamItem],
    *,
    max_new_tokens: int = 16,
    max_len: int = 1024,
    lockstep: bool = False,
) -> list[dict[str, Any]]:
    """One result per item: understanding answers (exact match or multiple choice) and text loss,
    generated visual tokens beside their targets. With `lockstep`, every item makes the same
    module calls in the same order (a fixed number of steps), as ZeRO-3's collective parameter
    gathers need when each rank scores different items."""
    cfg = model.config
    dev = next(model.parameters()).device
    stop = stop_ids(tokenizer, get_template(cfg.chat_template))
    collate = Collator(
        tokenizer,
        get_template(cfg.chat_template),
        ImageTokens(cfg.image_start_id, cfg.image_end_id, cfg.num_visual_tokens),
        cfg.vision_dim,
        max_len,
    )
    results = []
    for item in und:
        rec = item["record"]
        batch = collate([item])
        loss = None
        if batch.sample_ids or lockstep:
            out = model(**batch.model_inputs(dev, next(model.parameters()).dtype))
            loss = float(out.text_loss) if batch.sample_ids and batch.n_text else None
        prompt, answer = split_prompt(rec)
        ids, vis = encode_prompt(model, tokenizer, prompt, item.get("tokens"))
        g = generate(model, ids, vis, max_new_tokens=max_new_tokens, stop_ids=stop, lockstep=lockstep)
        text = tokenizer.decode([t for t in g.token_ids if t >= 0 and t not in stop], skip_special_tokens=True)
        row = {"kind": "understanding", "source": item["source"], "id": item["id"], "text_loss": loss}
        question = next(
            (p["text"] for m in reversed(prompt) if m["role"] == "user" for p in m["content"] if "text" in p), ""
        )
        row["qtype"] = question_type(question)
        if "choices" in rec and "answer_index" in rec:
            row["mc"] = multiple_choice_correct(text, rec["choices"], rec["answer_index"])
        else:
            row["em"] = exact_match(text, _answer_text(answer))
        results.append(row)
    for item in gen:
        rec = item["record"]
        prompt, answer = split_prompt(rec)
        target = _target_image(answer)
        # the image where training put it: after the assistant's own words, teacher-forced
        ids, vis = encode_for_image(model, tokenizer, [*prompt, answer], target, item["tokens"])
        g = generate(model, ids, vis, max_new_tokens=cfg.num_visual_tokens + 2, force_image=True, lockstep=lockstep)
        # and on its own: does the model start an image within FREE_BUDGET tokens of the bare prompt?
        ids, vis = encode_prompt(model, tokenizer, prompt, item["tokens"])
        free = generate(model, ids, vis, max_new_tokens=FREE_BUDGET, stop_ids=stop, lockstep=lockstep)
        results.append(
            {
                "kind": "generation",
                "source": item["source"],
                "id": item["id"],
                "generated": g.images[0],
                "target": np.asarray(item["tokens"][target], np.float32),
                "free_image": cfg.image_start_id in free.token_ids,
                "scene": parse_caption(rec.get("caption", "")) if isinstance(rec.get("caption"), str) else None,
            }
        )
    return results


def summarize(
    results: list[dict[str, Any]], suite: tuple[str, ...], n_candidates: int = 16, judge: Any = None
) -> dict[str, Any]:
    """The metrics of a list of results: `understanding/...`, `generation/...` and counts. With a
    `TokenJudge`, generated tokens of shapes-world captions are read and graded too."""
    out: dict[str, Any] = {}
    und = [r for r in results if r["kind"] == "understanding"]
    if "understanding" in suite:
        em = [r["em"] for r in und if "em" in r]
        mc = [r["mc"] for r in und if "mc" in r]
        if em:
            out["understanding/exact_match"] = float(np.mean(em))
        by_type = defaultdict(list)
        for r in und:
            if "em" in r and r.get("qtype"):
                by_type[r["qtype"]].append(r["em"])
        for qtype, vals in sorted(by_type.items()):
            out[f"understanding/exact_match/{qtype}"] = float(np.mean(vals))
        if mc:
            out["understanding/mc_accuracy"] = float(np.mean(mc))
        losses = defaultdict(list)
        for r in und:
            if r["text_loss"] is not None:
                losses[r["source"]].append(r["text_loss"])
        for source, vals in sorted(losses.items()):
            out[f"understanding/text_loss/{source}"] = float(np.mean(vals))
        if losses:
            out["understanding/text_loss"] = float(np.mean([v for vals in losses.values() for v in vals]))
        out["n_understanding"] = len(und)
    if "generation" in suite:
        gens = [r for r in results if r["kind"] == "generation"]
        if gens:
            g, t = np.stack([r["generated"] for r in gens]), np.stack([r["target"] for r in gens])
            out["generation/cosine"] = mean_token_cosine(g, t)
            out["generation/retrieval"] = retrieval_accuracy(g, t, n_candidates=min(n_candidates, len(g)))
            if len(g) > 2:
                out["generation/frechet"] = frechet_distance(g, t)
            out["generation/free_rate"] = float(np.mean([r["free_image"] for r in gens]))
            judged = [r for r in gens if r.get("scene") is not None]
            if judge is not None and judged:
                metrics = score([judge.read(r["generated"]) for r in judged], [r["scene"] for r in judged])
                out.update({f"generation/judge/{k}": v for k, v in metrics.items()})
                out.update({f"generation/judge/{k}/chance": v for k, v in chance().items()})
                out["n_judged"] = len(judged)
        out["n_generation"] = len(gens)
    return out


def judge_for(spec: Any, items: list[StreamItem]) -> Any:
    """The shapes-world token judge for `spec`'s token cache, or None: when no held-out generation
    item has a shapes-world caption, or the cache's encoder cannot be loaded here."""
    if spec.cache is None or not any(
        it["record"]["kind"] == "generation" and parse_caption(str(it["record"].get("caption", ""))) for it in items
    ):
        return None
    from vpit.judge import TokenJudge
    from vpit.model.encoder import EncoderConfig, load_encoder

    info = json.loads(storage.read_bytes(spec.sources[0].path, f"tokens/{spec.cache}/fingerprint.json"))
    s = info["settings"]
    keys = ("layer", "pooling", "tokens", "normalize", "dtype", "compute_dtype")
    try:
        encoder = load_encoder(
            EncoderConfig(encoder=info["encoder"], revision=info.get("revision"), **{k: s[k] for k in keys})
        )
    except ConfigError:  # e.g. a hub model that is not in this machine's cache
        return None
    return TokenJudge(encoder.encode) if encoder.fingerprint() == spec.cache else None


def evaluate_items(
    model,
    tokenizer,
    items: list[StreamItem],
    suite: tuple[str, ...] = ("understanding", "generation"),
    max_new_tokens: int = 16,
    n_candidates: int = 16,
    max_len: int = 1024,
    judge: Any = None,
) -> dict[str, Any]:
    """Metrics over held-out `items` in one process: a flat dict of `understanding/...` and
    `generation/...` keys."""
    model.eval()
    t0 = time.perf_counter()
    und, gen = _tasks(items, suite)
    out = summarize(
        score_items(model, tokenizer, und, gen, max_new_tokens=max_new_tokens, max_len=max_len),
        suite,
        n_candidates,
        judge,
    )
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def _share(items: list[StreamItem], rank: int, world_size: int) -> tuple[list[StreamItem], int]:
    """This rank's items (every world_size-th), padded with copies of the first so that every rank
    scores the same number; and how many of them are real."""
    mine = items[rank::world_size]
    per_rank = -(-len(items) // world_size)
    return mine + [items[0]] * (per_rank - len(mine)) if items else [], len(mine)


def evaluate_sharded(
    model,
    tokenizer,
    items: list[StreamItem],
    *,
    suite: tuple[str, ...],
    rank: int,
    world_size: int,
    max_new_tokens: int = 16,
    n_candidates: int = 16,
    max_len: int = 1024,
    judge: Any = None,
) -> dict[str, Any]:
    """`evaluate_items` with the items shared among ranks, on the live (ZeRO-3) model: each rank
    scores its share in lockstep, rank 0 gathers the results and summarises (others get {})."""
    t0 = time.perf_counter()
    und, gen = _tasks(items, suite)
    (my_und, n_und), (my_gen, n_gen) = _share(und, rank, world_size), _share(gen, rank, world_size)
    # lockstep only where ranks must make the same collective calls: one rank needs none of it
    results = score_items(
        model, tokenizer, my_und, my_gen, max_new_tokens=max_new_tokens, max_len=max_len, lockstep=world_size > 1
    )
    results = results[:n_und] + results[len(my_und) : len(my_und) + n_gen]  # the padding's results go
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, results)
    if rank != 0:
        return {}
    order = {it["id"]: k for k, it in enumerate(und + gen)}  # the single-process order, whatever the world
    merged = sorted((r for part in gathered for r in part), key=lambda r: order[r["id"]])
    out = summarize(merged, suite, n_candidates, judge)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def heldout_for(cfg: Any) -> list[StreamItem]:
    """The held-out items a training config evaluates on (eval_max_per_source per source)."""
    from vpit.mixtures import heldout_items, load_spec

    spec = load_spec(cfg.data.mixture, dict(cfg.data.mixture_overrides) or None)
    return heldout_items(spec, max_per_source=cfg.eval_max_per_source)


def write_eval(run_dir: str | Path, step: int, metrics: dict[str, Any]) -> Path:
    """One JSON per evaluation: RUN/eval/step-000123.json."""
    path = Path(run_dir) / "eval" / f"step-{step:06d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, **metrics}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _warn_if_replanned(run_dir: Path, spec: Any) -> None:
    """The held-out split is worked out again from the datasets as they are now; grouped by image,
    a dataset re-ingested or extended since training can move a trained sample into it. The plan
    hash names the split, so a different one is said (the evaluation still runs)."""
    from vpit.mixtures import make_plan

    saved = Path(run_dir) / "plan" / "plan.json"
    if not saved.is_file():
        return
    then, now = json.loads(saved.read_text(encoding="utf-8"))["hash"], make_plan(spec).hash
    if then != now:
        print(
            f"warning: {run_dir} was trained on plan {then}, its mixture now plans as {now} (a dataset or the "
            "spec changed): the held-out split may include samples the run trained on",
            file=sys.stderr,
        )


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
    from vpit.train.checkpoint import read_state
    from vpit.train.export import load_checkpoint_model, resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    run_dir = ckpt.parent.parent
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    if not cfg["data"].get("mixture"):
        raise ConfigError(f"{run_dir}: trained on synthetic data, which has no held-out split to evaluate on")
    spec = load_spec(cfg["data"]["mixture"], cfg["data"].get("mixture_overrides") or None)
    _warn_if_replanned(run_dir, spec)
    items = heldout_items(spec, max_per_source=max_per_source)
    model, tokenizer = load_checkpoint_model(ckpt)
    metrics = evaluate_items(
        model, tokenizer, items, suite=suite, max_len=cfg["data"].get("max_len", 1024), judge=judge_for(spec, items)
    )
    if step is None:
        step = read_state(ckpt).step
    write_eval(run_dir, step, metrics)
    return metrics
