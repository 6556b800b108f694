"""The demo's grid stage: a 3x3 mixture ablation (understanding count x generation count), two seeds
per cell, on local Ray, then the mixing law and its optimum.

It writes the three files a user would write for `vpit grid run` (a base mixture that
includes the demo spec, a training YAML for a small model, the grid YAML) under OUT/grid/,
runs every cell as a Ray task (train one pass over the cell's mixture, evaluate on the
held-out split with the shapes-world judge), fits the mixing law, runs its predicted best
split of the largest cell's budget as one more cell (`vpit grid run --optimum`) and writes
the report: heatmaps with the spread between seeds, findings in words, the law's error, the
Pareto front, the optimum predicted against measured. The axis values are a quarter, a half
and all of the understanding group's planned amount, and an eighth, a quarter and a half of
the generation group's (the larger one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["grid_stage", "write_demo_grid"]


def write_demo_grid(
    out: Path,
    *,
    understanding: list[int],
    generation: list[int],
    seeds: tuple[int, ...] = (0, 1),
    micro_batch: int = 16,
) -> Path:
    """Write OUT/grid/{base,train,grid}.yaml; return the grid YAML's path."""
    from vpit.demo.recipe import DEMO_LR, DEMO_MAX_LEN, DEMO_MODEL
    from vpit.mixtures import load_spec, make_plan

    root = Path(out) / "grid"
    root.mkdir(parents=True, exist_ok=True)
    plan = make_plan(load_spec(Path(out) / "mixtures" / "demo.yaml"))
    (root / "base.yaml").write_text(
        "# The demo mixture (held-out split included); every cell sets its own understanding and generation counts.\n"
        "include: ../mixtures/demo.yaml\n",
        encoding="utf-8",
    )
    (root / "train.yaml").write_text(
        "\n".join(
            [
                "# A small VPiT model for the demo grid; each cell trains one pass over its own mixture.",
                "output_dir: unused   # each cell sets its own",
                f"model: {{llm: tiny, tokenizer: ../tokenizer, chat_template: chatml, vision_dim: {plan.dim}, "
                f"num_visual_tokens: {plan.m}, " + ", ".join(f"{k}: {v}" for k, v in DEMO_MODEL.items()) + "}",
                f"data: {{mixture: base.yaml, max_len: {DEMO_MAX_LEN}, num_workers: 0}}",
                f"micro_batch_size: {micro_batch}",
                "max_steps: null      # one pass over the cell's mixture",
                f"lr: {DEMO_LR}",
                f"lr_reference_batch: {micro_batch}",
                "warmup_steps: 5",
                "save_every: 100000   # the end only",
                "eval_max_per_source: 8",
                "",
            ]
        ),
        encoding="utf-8",
    )
    grid = {
        "name": "demo",
        "base": "base.yaml",
        "train": "train.yaml",
        "axes": {"groups.understanding.count": understanding, "groups.generation.count": generation},
        "seeds": list(seeds),
        "eval": {"suite": ["understanding", "generation"], "every_steps": 0},
        "resources": {"num_cpus": 1},
        "optimum": {"budget": max(understanding) + max(generation), "weight": 0.5},
    }
    path = root / "grid.yaml"
    path.write_text(
        "# Written by `vpit demo`; re-run with: vpit grid run THIS (finished cells are skipped)\n"
        + yaml.safe_dump(grid, sort_keys=False, default_flow_style=None),
        encoding="utf-8",
    )
    return path


def grid_stage(
    out: str | Path, *, values: int = 3, seeds: tuple[int, ...] = (0, 1), ray_address: str | None = None
) -> dict[str, Any]:
    """Write, plan, run and report the demo grid and its optimum; return the report's files, rows and law."""
    from vpit.grid.commands import plan_grid, run_optimum, write_grid_report
    from vpit.grid.run import collect_optimum, collect_rows, run_grid
    from vpit.grid.spec import load_grid
    from vpit.mixtures import load_spec, make_plan

    out = Path(out)
    groups = dict(make_plan(load_spec(out / "mixtures" / "demo.yaml")).groups)
    u, g = groups["understanding"], groups["generation"]
    # A quarter, a half and all of understanding; an eighth, a quarter and a half of generation (the
    # demo's generation group is large: a cell then trains in seconds, one pass over its mixture).
    fractions = (0.25, 0.5, 1.0)[-values:] if values <= 3 else tuple((i + 1) / values for i in range(values))
    axes = {
        "understanding": sorted({max(1, round(u * f)) for f in fractions}),
        "generation": sorted({max(1, round(g * f / 2)) for f in fractions}),
    }
    path = write_demo_grid(out, seeds=seeds, **axes)
    spec = load_grid(path)
    print(f"    wrote {path} (+ base.yaml, train.yaml)\n    vpit grid run {path} --optimum")
    print("\n".join("      " + line for line in plan_grid(spec).splitlines()))  # infeasible cells fail here
    grid_out = path.parent / f"{spec.name}-grid"
    result = run_grid(spec, grid_out, ray_address=ray_address)
    print("\n".join("    " + line for line in result.summary().splitlines()))
    rows, failed = collect_rows(grid_out, spec)
    if not rows:
        raise RuntimeError(f"every grid cell failed; see {grid_out}/cells/*/train.log")
    print("\n".join("    " + line for line in run_optimum(spec, grid_out, ray_address).splitlines()))
    files = write_grid_report(spec, grid_out)
    law = json.loads(files["laws"].read_text()) if "laws" in files else {}
    text = files["markdown"].read_text(encoding="utf-8")
    found = [ln[2:] for ln in text.split("## Findings", 1)[-1].split("\n## ")[0].splitlines() if ln.startswith("- ")]
    print("    findings:\n" + "\n".join("      " + f for f in found))
    for fit in law.get("laws", {}).values():
        print(f"    law {fit['describe']}  (leave-one-cell-out RMSE {fit['rmse']:.4f}, seed sd {fit['seed_sd']:.4f})")
    opt = law.get("optimum", {})
    print(f"    report {files['markdown']} ({sum(1 for k in files if k.startswith('heatmap:'))} heatmaps, pareto.png)")
    return {
        "grid": str(path),
        "out": str(grid_out),
        "axes": {a: list(v) for a, v in spec.axes.items()},
        "seeds": list(spec.seeds),
        "rows": rows,
        "failed": failed,
        "findings": found,
        "law": {m: {k: f[k] for k in ("describe", "rmse", "mae", "seed_sd")} for m, f in law.get("laws", {}).items()},
        "optimum": {
            "counts": opt.get("counts"),
            "predicted": opt.get("predicted"),
            "measured": opt.get("measured"),
            "cells": [r["cell"] for r in collect_optimum(grid_out)],
        },
        "files": {k: str(v) for k, v in files.items()},
    }
