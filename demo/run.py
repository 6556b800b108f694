"""`vpit demo`: the whole pipeline, end to end, on generated shapes-world data, then a report.

Nine stages, each timed, each with a progress bar: 1 generate raw data of all four kinds,
2 ingest, 3 precompute visual tokens, 4 plan the mixture, 5 train, 6 evaluate on the
held-out split, 7 a 2x2 mixture grid on Ray, 8 train the diffusion decoder, 9 generate
images from unseen prompts. Every stage writes the same folders the matching `vpit`
command would, so a user can re-run any of them by hand; the report (OUT/report.html and
OUT/report.md) shows what each produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vpit.errors import ConfigError

__all__ = ["QUICK", "DemoConfig", "run_demo"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DemoConfig:
    samples: int = 400
    """Shapes-world LLaVA records (understanding) to generate."""
    pairs: int = 2400
    """Captioned images served over localhost for img2dataset (generation): the model learns to draw
    from these, and unseen prompts need a couple of thousand."""
    clips: int = 12
    """Video clips of a moving shape (video prediction and video QA)."""
    edits: int = 40
    """Editing triplets."""
    train_steps: int = 1000
    """Optimizer steps of the demo VPiT model (16 samples each)."""
    eval_per_source: int = 32
    """Held-out samples per source that stage 6 evaluates."""
    grid_values: int = 3
    """Values per grid axis (a quarter, a half and all of each group's amount)."""
    grid_seeds: int = 2
    """Seeds per grid cell (model init and data order): the spread the heatmaps show."""
    decoder_steps: int = 1200
    """Diffusion decoder steps (1,000 and more read back most colours from true tokens; 400, a third)."""
    prompts: int = 6
    """Unseen prompts shown in the gallery."""
    judged: int = 48
    """Unseen prompts generated, decoded and judged (the judge's numbers)."""
    workers: int | None = None
    """Ray workers for ingest; default: the CPUs of the Ray cluster."""

    def __post_init__(self):
        bad = [
            f"{f.name}: expected >= 1, got {getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None and getattr(self, f.name) < 1
        ]
        if self.samples < 50:
            bad.append(f"samples: expected >= 50 (the held-out split and the grid need some), got {self.samples}")
        if self.pairs < 10:
            bad.append(f"pairs: expected >= 10, got {self.pairs}")
        if self.prompts < 2:
            bad.append(f"prompts: expected >= 2 (each is compared with the others), got {self.prompts}")
        if self.grid_values < 2:
            bad.append(f"grid_values: expected >= 2 (a law needs two amounts per axis), got {self.grid_values}")
        if bad:
            raise ConfigError("invalid demo settings:\n  " + "\n  ".join(bad))

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A shortened demo (about a third of the time): less data, fewer steps; same stages, same files."""
        return cls(**{**QUICK, **overrides})


# `vpit demo --quick`: less data, fewer steps; the same stages and files.
QUICK = {
    "samples": 160,
    "pairs": 400,
    "clips": 6,
    "edits": 20,
    "train_steps": 150,
    "eval_per_source": 8,
    "grid_values": 2,
    "decoder_steps": 100,
    "prompts": 3,
    "judged": 12,
}


STAGES = (
    ("generate", "generate raw shapes-world data of all four kinds, in their raw formats"),
    ("ingest", "ingest each raw source into WebDataset shards (Ray Data; bad records quarantined)"),
    ("precompute", "precompute every image's visual tokens once with the tiny SigLIP (Ray actor pool)"),
    ("mixture", "plan the demo mixture: exact counts per source, 10% held out for evaluation"),
    ("train", "train a tiny VPiT model on the mixture (DeepSpeed ZeRO-3, CPU), export it"),
    ("evaluate", "evaluate the trained model on the held-out split"),
    ("grid", "run a mixture grid (understanding x generation amounts, 2 seeds) on local Ray, fit the mixing law"),
    ("decoder", "train the diffusion decoder (visual tokens -> pixels) on the token cache"),
    ("generate images", "generate images from unseen prompts: VPiT tokens -> decoder -> pixels -> the judge"),
)


def _precompute_all(out: Path) -> dict[str, Any]:
    from vpit.demo.recipe import DEMO_ENCODER
    from vpit.pipelines.precompute import PrecomputeConfig, run_precompute

    facts: dict[str, Any] = {"datasets": {}}
    for folder in sorted((out / "datasets").iterdir()):
        report = run_precompute(folder, DEMO_ENCODER, PrecomputeConfig(actors=1))
        print("\n".join("    " + line for line in report.summary().splitlines()))
        facts["fingerprint"], facts["m"], facts["dim"] = report.fingerprint, report.m, report.dim
        facts["datasets"][folder.name] = {"images": report.images, "bytes": report.cache_bytes}
    return facts


def _mixture(out: Path) -> dict[str, Any]:
    from vpit.demo.mixture_stage import mixture_stage
    from vpit.mixtures import load_spec, make_plan

    spec = mixture_stage(out)
    plan = make_plan(load_spec(spec))
    return {
        "spec": str(spec),
        "hash": plan.hash,
        "total": plan.total,
        "heldout": plan.spec.heldout,
        # training samples sharing an image with a held-out one: by id hash alone, and by image
        "leak": {
            "by_id": sum(r["leak_by_id"] for r in plan.heldout),
            "by_image": sum(r["leak_by_image"] for r in plan.heldout),
            "moved": sum(r["moved"] for r in plan.heldout),
        },
        "ratio_png": str(spec.with_name("demo.ratio.png")),
        "groups": dict(plan.groups),
        "sources": [
            {"name": s.name, "group": s.group, "kind": s.kind, "available": s.available, "planned": s.count}
            for s in plan.sources
        ],
    }


def _train(out: Path, steps: int) -> dict[str, Any]:
    from vpit.demo.train_stage import train_stage

    summary = train_stage(out, steps=steps)
    return {
        "first": summary["first"],
        "last": summary["last"],
        "run": str(out / "train" / "run"),
        "loss_png": str(out / "train" / "run" / "loss.png"),
        "export": str(out / "train" / "export"),
        "config": str(out / "train" / "demo.yaml"),
    }


def _evaluate(out: Path, per_source: int) -> dict[str, Any]:
    from tqdm import tqdm

    from vpit.train.evaluate import evaluate_run

    run = out / "train" / "run"
    print(f"    vpit eval {run} --max-per-source {per_source}")
    with tqdm(total=1, desc="evaluate", unit="run") as bar:
        metrics = evaluate_run(run, max_per_source=per_source)
        bar.update(1)
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"    {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"    {key:<{width}}  {value}")
    return metrics


def _decoder(out: Path, steps: int) -> dict[str, Any]:
    from vpit.demo.decoder_stage import decoder_stage

    summary = decoder_stage(out, steps=steps)
    return {
        **summary,
        "loss_png": str(out / "decoder" / "loss.png"),
        "heldout_png": str(out / "decoder" / "heldout.png"),
    }


def _stage_functions(out: Path, cfg: DemoConfig, base_url: Callable[[], str]) -> dict[str, Callable[[dict], Any]]:
    from vpit.demo.gallery import gallery_stage
    from vpit.demo.grid_stage import grid_stage
    from vpit.demo.sources import generate_raw, ingest_raw

    return {
        "generate": lambda f: generate_raw(
            out, samples=cfg.samples, pairs=cfg.pairs, clips=cfg.clips, edits=cfg.edits, base_url=base_url()
        ),
        "ingest": lambda f: ingest_raw(out, f["generate"], workers=cfg.workers),
        "precompute": lambda f: _precompute_all(out),
        "mixture": lambda f: _mixture(out),
        "train": lambda f: _train(out, cfg.train_steps),
        "evaluate": lambda f: _evaluate(out, cfg.eval_per_source),
        "grid": lambda f: grid_stage(out, values=cfg.grid_values, seeds=tuple(range(cfg.grid_seeds))),
        "decoder": lambda f: _decoder(out, cfg.decoder_steps),
        "generate images": lambda f: gallery_stage(out, n=cfg.prompts, judged=max(cfg.judged, cfg.prompts)),
    }


def format_summary(out: Path, facts: dict[str, Any], seconds: dict[str, float], html: Path) -> str:
    ing = facts["ingest"]
    ev = facts["evaluate"]
    gal = facts["generate images"]["scores"]
    dec = facts["decoder"].get("heldout", {})
    results = {
        "generate": "4 kinds under raw/",
        "ingest": f"{sum(d['samples'] for d in ing.values())} samples in {len(ing)} datasets, "
        f"{sum(sum(d['quarantined'].values()) for d in ing.values())} quarantined",
        "precompute": f"cache {facts['precompute']['fingerprint']} (m={facts['precompute']['m']}, "
        f"d={facts['precompute']['dim']})",
        "mixture": f"{facts['mixture']['total']} samples, plan {facts['mixture']['hash']}",
        "train": f"text loss {facts['train']['first']['text_loss']:.2f} -> {facts['train']['last']['text_loss']:.2f}, "
        f"vision {facts['train']['first']['vision_loss']:.2f} -> {facts['train']['last']['vision_loss']:.2f}",
        "evaluate": f"exact match {ev.get('understanding/exact_match', float('nan')):.2f}, "
        f"generation cosine {ev.get('generation/cosine', float('nan')):.3f}, colour at position (tokens) "
        f"{ev.get('generation/judge/colour_at_position', float('nan')):.2f}",
        "grid": f"{len(facts['grid']['rows'])} runs, {len(facts['grid']['failed'])} failed, "
        + ", ".join(
            f"law {m.split('/')[-1].replace('_', ' ')} LOO RMSE {v['rmse']:.3f}"
            for m, v in facts["grid"]["law"].items()
        ),
        "decoder": f"held-out MSE own {dec.get('matched_mse', float('nan')):.3f} "
        f"vs other {dec.get('mismatched_mse', float('nan')):.3f}",
        "generate images": f"{gal['prompts']} unseen prompts judged: background {gal['judge']['background']:.0%} "
        f"(chance {gal['chance']['background']:.0%}), colour at position {gal['judge']['colour_at_position']:.0%} "
        f"(chance {gal['chance']['colour_at_position']:.0%})",
    }
    lines = ["", "demo summary", f"  {'stage':<18}{'seconds':>8}  result"]
    for i, (name, _) in enumerate(STAGES, 1):
        lines.append(f"  {i} {name:<16}{seconds[name]:>8.0f}  {results[name]}")
    lines.append(f"  {'total':<18}{sum(seconds.values()):>8.0f}")
    lines += [
        "",
        f"report: {html}  (open it in a browser; the same as markdown: {html.with_suffix('.md')})",
        f"everything else under {out}/",
    ]
    return "\n".join(lines)


def run_demo(output: str | Path, config: DemoConfig | None = None) -> dict[str, Any]:
    """Run every stage into `output`; return {"facts", "seconds", "html", "markdown"}."""
    from vpit.demo.corpora import serve_http
    from vpit.demo.html import write_report
    from vpit.demo.report import build_report

    cfg = config or DemoConfig()
    out = Path(output).resolve()
    if (out / "demo.json").exists() or (out / "raw").exists():
        raise ConfigError(f"{out} already holds a demo; pass another --output or delete it")
    www = out / "raw" / "pairs" / "www"
    www.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # The pairs' "web": up from stage 1 (the URL list names it) until stage 2 has downloaded them.
        base = stack.enter_context(serve_http(www))
        stages = _stage_functions(out, cfg, lambda: base)
        for i, (name, title) in enumerate(STAGES, 1):
            print(f"\n[{i}/{len(STAGES)}] {title}", flush=True)
            t0 = time.perf_counter()
            facts[name] = stages[name](facts)
            seconds[name] = time.perf_counter() - t0
            print(f"    ({seconds[name]:.0f}s)", flush=True)
            if name == "ingest":
                stack.close()
    facts["generate"] = dataclasses.asdict(facts["generate"])
    total = time.perf_counter() - t_start
    html, md = write_report(build_report(out, cfg, facts, seconds, total), out)
    gallery, grid = facts["generate images"]["scores"], facts["grid"]
    (out / "demo.json").write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(cfg),
                "seconds": seconds,
                "total_s": total,
                # the judge on the decoded images of unseen prompts, with chance beside it
                "judge": {**gallery["judge"], "chance": gallery["chance"], "prompts": gallery["prompts"]},
                "judge_tokens": gallery["judge_tokens"],
                "grid": {"law": grid["law"], "optimum": grid["optimum"], "findings": grid["findings"]},
                "facts": facts,
            },
            indent=1,
            default=str,
        )
        + "\n",
        encoding="utf-8",
    )
    print(format_summary(out, facts, seconds, html))
    return {"facts": facts, "seconds": seconds, "total_s": total, "html": html, "markdown": md}
