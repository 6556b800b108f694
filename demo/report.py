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
                f"{m['heldout']:.0%} of every source is held out by id hash for evaluation and never trained on. "
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
                "Understanding: greedy answers, exact match after normalisation, and text loss per source. "
                "Generation: the model's visual tokens against the true image's cached tokens (mean cosine, "
                "retrieval among the held-out images, Fréchet distance in token space)."
            ),
            Table(("metric", "value"), rows),
        ),
    )


def _grid(facts: dict[str, Any]) -> Section:
    g = facts["grid"]
    axes = list(g["axes"])
    heatmaps = [(k.split(":", 1)[1], Path(v)) for k, v in g["files"].items() if k.startswith("heatmap:")]
    metrics = [k for k, _ in heatmaps]
    rows = tuple(tuple(r.get(c, "") for c in axes) + tuple(_num(r.get(m, "")) for m in metrics) for r in g["rows"])
    blocks: list = [
        Para(
            f"`{Path(g['grid']).name}`: {len(g['rows'])} cells, each a tiny model trained {g['steps']} steps and "
            f"evaluated on the held-out split as a Ray task; axes "
            + " x ".join(f"`{a}` {g['axes'][a]}" for a in axes)
            + ". Rows of each heatmap are the "
            "first axis, columns the second (MetaMorph's Figure 7 layout)."
        ),
        *[Figure(p, name, 300) for name, p in heatmaps],
    ]
    if "correlation" in g["files"]:
        blocks.append(
            Figure(Path(g["files"]["correlation"]), "understanding vs generation metrics across cells (Pearson r)", 900)
        )
    blocks.append(Table(tuple(a.split(".")[-2] for a in axes) + tuple(metrics), rows))
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
            note=f"token cosine to its own true image {r['cos_own']:.3f}, to the other prompts' {r['cos_others']:.3f}",
        )
        for r in g["rows"]
    )
    return Section(
        "9. Images from unseen prompts",
        (
            Para(
                "Captions of scenes that appear nowhere in the training data. The trained model generates 64 visual "
                "tokens for each; the decoder turns them into pixels. Beside them: the scene rendered by shapes_world, "
                "and the decoder applied to that true image's own tokens (the best a VPiT model could hand it)."
            ),
            Gallery(rows),
            Para(
                f"Generated tokens vs the true image's tokens: mean cosine {s['cos_own']:.3f} to their own prompt's, "
                f"{s['cos_others']:.3f} to the other prompts'; {s['closer_to_own']} of {s['prompts']} are closer to "
                "their own. A tiny model trained for a minute on CPU learns little of the prompt; the right-hand "
                "column shows the decoder itself works."
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
