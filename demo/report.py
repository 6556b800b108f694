"""The demo's report: what each stage produced, as sections of `vpit.demo.html` blocks.

Reads only the facts the stages returned and the files they wrote under the demo folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vpit.demo.html import Figure, Gallery, GalleryRow, Para, Report, Section, Table

__all__ = ["build_report"]


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _timing(stages: tuple, seconds: dict[str, float], total: float) -> Section:
    rows = tuple((f"{i}. {name}", f"{seconds[name]:.0f}") for i, (name, _) in enumerate(stages, 1))
    return Section(
        "Stages and wall time",
        (
            Table(("stage", "seconds"), rows + (("total", f"{total:.0f}"),)),
            Para(
                "Each stage wrote the folders the matching `vpit` command writes; re-run any of them by hand "
                "(README, 'A worked example per stage')."
            ),
        ),
    )


def _ingest(facts: dict[str, Any]) -> Section:
    raw = facts["generate"]["counts"]
    rows, reasons = [], []
    for name, d in facts["ingest"].items():
        q = d["quarantined"]
        rows.append(
            (
                name,
                d["samples"],
                ", ".join(f"{k} {v}" for k, v in d["kinds"].items()),
                sum(q.values()),
                ", ".join(f"{k} {v}" for k, v in q.items()) or "-",
            )
        )
        reasons += list(q)
    return Section(
        "1-2. Raw data and ingest",
        (
            Para("Raw inputs written in stage 1, each with bad records on purpose:"),
            Table(("kind", "raw input"), tuple(raw.items())),
            Para(
                "Ingested datasets (`datasets/NAME`: WebDataset tars + index + manifest). Bad records never stop "
                "a job: they go to `quarantine.jsonl` with the reason and the record's origin."
            ),
            Table(("dataset", "samples", "per kind", "quarantined", "reasons"), tuple(rows)),
            *(
                [Para(facts["ingest"]["generation"]["note"])]
                if facts["ingest"].get("generation", {}).get("note")
                else []
            ),
        ),
    )


def _precompute(facts: dict[str, Any]) -> Section:
    p = facts["precompute"]
    rows = tuple((name, d["images"], f"{d['bytes'] / 1024:.0f} KiB") for name, d in p["datasets"].items())
    return Section(
        "3. Visual tokens (token cache)",
        (
            Para(
                f"Every image encoded once by the tiny random SigLIP: m = {p['m']} tokens of d = {p['dim']} per image, "
                f"stored in `datasets/NAME/tokens/{p['fingerprint']}/` beside the shards."
            ),
            Table(("dataset", "images", "cache size"), rows),
        ),
    )


def _mixture(facts: dict[str, Any]) -> Section:
    m = facts["mixture"]
    rows = tuple(
        (
            s["name"],
            s["group"],
            s["kind"] or "any",
            s["available"],
            s["planned"],
            f"{s['planned'] / max(1, s['available']):.2f}x",
        )
        for s in m["sources"]
    )
    groups = tuple((g, n, f"{n / m['total']:.1%}") for g, n in m["groups"].items()) + (("total", m["total"], "100%"),)
    return Section(
        "4. Mixture plan",
        (
            Para(
                f"`{Path(m['spec']).name}` planned to exact counts (plan hash `{m['hash']}`); "
                f"{m['heldout']:.0%} of every source is held out by id hash for evaluation, with every sample "
                f"that shares an image with a held-out one ({m.get('leak', {}).get('moved', 0):,} more): the id "
                f"hash alone would have trained on {m.get('leak', {}).get('by_id', 0):,} samples sharing a "
                f"held-out image, the image split on {m.get('leak', {}).get('by_image', 0):,}. "
                "`available` is each source's training split."
            ),
            Table(("source", "group", "kind", "available", "planned", "repeat"), rows),
            Table(("group", "planned", "share"), groups),
            Figure(
                Path(m["ratio_png"]),
                "cumulative group ratio of the first batches read through the stream, against the plan",
                560,
            ),
        ),
    )


def _train(facts: dict[str, Any]) -> Section:
    t = facts["train"]
    f, last = t["first"], t["last"]
    return Section(
        "5. Training",
        (
            Para(
                f"A tiny VPiT model (a 2-layer LLM with the Qwen2.5 tokenizer, input projector, vision head) trained "
                f"{last['step']} steps with DeepSpeed ZeRO-3 on CPU (`{Path(t['config']).name}`). Text loss "
                f"{f['text_loss']:.3f} -> {last['text_loss']:.3f}, vision (cosine) loss {f['vision_loss']:.3f} -> "
                f"{last['vision_loss']:.3f}."
            ),
            Figure(Path(t["loss_png"]), "loss curves (text cross-entropy and visual-token cosine loss)", 640),
        ),
    )


def _evaluate(facts: dict[str, Any]) -> Section:
    rows = tuple((k, _num(v)) for k, v in facts["evaluate"].items())
    return Section(
        "6. Evaluation on the held-out split",
        (
            Para(
                "Understanding: greedy answers, exact match after normalisation (overall and per kind of question), "
                "and text loss per source. Generation, asked for where training puts the image (after the "
                "assistant's own words): the model's visual tokens against the true image's cached tokens (mean "
                "cosine, retrieval among the held-out images, Fréchet distance in token space), the judge's reading "
                "of them with each metric's chance level, and how often the model starts an image by itself "
                "(free_rate)."
            ),
            Table(("metric", "value"), rows),
        ),
    )


def _grid(facts: dict[str, Any]) -> Section:
    g = facts["grid"]
    axes = list(g["axes"])
    files = {k: Path(v) for k, v in g["files"].items()}
    heatmaps = [(k.split(":", 1)[1], p) for k, p in files.items() if k.startswith("heatmap:")]
    key = [
        m for m in ("understanding/exact_match", "generation/judge/background", "generation/judge/colour_at_position")
    ]
    first = [(m, p) for m, p in heatmaps if m in key]
    rest = [(m, p) for m, p in heatmaps if m not in key]
    metrics = [m for m, _ in heatmaps]
    rows = tuple(
        tuple(r.get(c, "") for c in axes) + (r.get("seed", ""),) + tuple(_num(r.get(m, "")) for m in metrics)
        for r in g["rows"]
    )
    blocks: list = [
        Para(
            f"`{Path(g['grid']).name}`: {len(g['rows'])} runs, seeds {g['seeds']} of every cell: a small model "
            "trained one pass over the cell's mixture, then evaluated on the held-out split (the judge reads the "
            "generated tokens of shapes-world prompts) as a Ray task; axes "
            + " x ".join(f"`{a}` {g['axes'][a]}" for a in axes)
            + ". Rows of each heatmap are the first axis, columns the second (MetaMorph's Figure 7 layout); each "
            "cell shows the mean over seeds and, under it, their standard deviation."
        ),
    ]
    if g.get("findings"):
        blocks += [Para("What the grid says, computed from its numbers:"), *[Para("- " + f) for f in g["findings"]]]
    blocks += [Figure(p, name, 330) for name, p in first]
    if g.get("law"):
        blocks.append(
            Table(
                ("metric", "mixing law (fitted over every cell and seed)", "leave-one-cell-out RMSE", "seed sd"),
                tuple((m, v["describe"], f"{v['rmse']:.4f}", f"{v['seed_sd']:.4f}") for m, v in g["law"].items()),
            )
        )
    opt = g.get("optimum") or {}
    if opt.get("counts"):
        measured = opt.get("measured") or {}
        blocks.append(
            Para(
                "The laws' best split of the largest cell's budget: "
                + ", ".join(f"`{a}` {n:,}" for a, n in opt["counts"].items())
                + ". Predicted against measured (mean of its seeds, run as one more cell): "
                + "; ".join(
                    f"{m} {p:.3f} vs {measured[m]:.3f}" if m in measured else f"{m} {p:.3f} (not run)"
                    for m, p in opt["predicted"].items()
                )
                + "."
            )
        )
    if "pareto" in files:
        blocks.append(Figure(files["pareto"], "Pareto front: understanding vs generation, cells and the law", 620))
    blocks += [Figure(p, name, 300) for name, p in rest]
    if "correlation" in files:
        blocks.append(Figure(files["correlation"], "understanding vs generation metrics across runs (Pearson r)", 900))
    blocks.append(Table(tuple(a.split(".")[-2] for a in axes) + ("seed",) + tuple(metrics), rows))
    if g["failed"]:
        blocks.append(Para("Failed cells: " + ", ".join(f["cell"] for f in g["failed"])))
    return Section("7. Mixture grid", tuple(blocks))


def _decoder(facts: dict[str, Any]) -> Section:
    d = facts["decoder"]
    h = d.get("heldout", {})
    text = (
        f"A tiny DiT (diffusers) trained {d['steps']} DDPM steps to turn the cached visual tokens of "
        f"{d['train_pairs']} images back into pixels."
    )
    if h:
        text += (
            f" On {h['pairs']} held-out images its samples are closer to their own image (pixel MSE "
            f"{h['matched_mse']:.4f}) than to the other held-out images ({h['mismatched_mse']:.4f})."
        )
    return Section(
        "8. Diffusion decoder",
        (
            Para(text),
            Figure(Path(d["loss_png"]), "decoder training loss (noise-prediction MSE)", 420),
            Figure(
                Path(d["heldout_png"]),
                "held-out images (top) and the decoder's samples from their tokens (bottom)",
                1000,
            ),
        ),
    )


def _gallery(facts: dict[str, Any]) -> Section:
    g = facts["generate images"]
    s = g["scores"]
    rows = tuple(
        GalleryRow(
            r["prompt"],
            (
                ("true image (rendered)", Path(r["true"])),
                ("generated: VPiT tokens -> decoder", Path(r["generated"])),
                ("decoder on the true image's tokens", Path(r["from_true_tokens"])),
            ),
            note="judge: " + r["verdict"],
        )
        for r in g["rows"]
    )
    chance = s["chance"]
    table = tuple(
        (what,) + tuple(f"{s[key][m]:.0%}" for m in chance)
        for what, key in (
            ("generated, decoded to pixels", "judge"),
            ("generated tokens, read directly", "judge_tokens"),
            ("true image's tokens, decoded (the decoder's ceiling)", "judge_true_tokens_decoded"),
        )
    ) + (("chance (a uniform random reading)",) + tuple(f"{v:.0%}" for v in chance.values()),)
    return Section(
        "9. Images from unseen prompts, judged",
        (
            Para(
                f"Captions of {s['prompts']} scenes that appear nowhere in the training data. The trained model "
                f"generates {facts['precompute']['m']} visual tokens for each, after its template's words, as in "
                "training; the decoder turns them into pixels, and the judge reads the picture: the background, and "
                "in each quadrant the colour and kind of shape. Beside them: the scene rendered by shapes_world, and "
                "the decoder applied to that true image's own tokens (the best a VPiT model could hand it)."
            ),
            Table(("judged", *(m.replace("_", " ") for m in chance)), table),
            Gallery(rows),
            Para(
                f"Generated tokens vs the true image's tokens: mean cosine {s['cos_own']:.3f} to their own prompt's, "
                f"{s['cos_others']:.3f} to the other prompts'."
            ),
        ),
    )


def build_report(out: Path, cfg: Any, facts: dict[str, Any], seconds: dict[str, float], total: float) -> Report:
    from vpit.demo.run import STAGES

    intro = (
        f"What `vpit demo` did in {total / 60:.1f} minutes on this machine, on generated shapes-world data "
        f"({cfg.samples} LLaVA records, {cfg.pairs} image-text pairs, {cfg.clips} clips, {cfg.edits} edits). "
        f"Everything shown lives under `{out}`."
    )
    return Report(
        "vpit demo report",
        intro,
        (
            _timing(STAGES, seconds, total),
            _ingest(facts),
            _precompute(facts),
            _mixture(facts),
            _train(facts),
            _evaluate(facts),
            _grid(facts),
            _decoder(facts),
            _gallery(facts),
        ),
    )
