"""The demo's grid stage: a 2x2 mixture ablation (understanding count x generation count) on local Ray.

It writes the three files a user would write for `vpit grid run` (a base mixture that
includes the demo spec, a training YAML for a tiny model, the grid YAML) under OUT/grid/,
runs every cell as a Ray task (train + evaluate on the held-out split) and writes the
report: results table, one heatmap per metric (MetaMorph's Figure 7 layout) and the
understanding-vs-generation correlation plot. The axis values are a quarter and all of each
group's planned amount, so the cells differ four-fold in what they hold of each kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["grid_stage", "write_demo_grid"]


def write_demo_grid(
    out: Path, *, steps: int, understanding: list[int], generation: list[int], micro_batch: int = 8
) -> Path:
    """Write OUT/grid/{base,train,grid}.yaml; return the grid YAML's path."""
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
                "# A tiny VPiT model for the demo grid; each cell trains it for the same number of steps.",
                "output_dir: unused   # each cell sets its own",
                "model: {llm: tiny, tokenizer: qwen2.5, chat_template: chatml, "
                f"vision_dim: {plan.dim}, num_visual_tokens: {plan.m}, hidden_size: 32, num_heads: 2, "
                "intermediate_size: 64, num_layers: 1}",
                "data: {mixture: base.yaml, max_len: 1024, num_workers: 0}",
                f"micro_batch_size: {micro_batch}",
                f"max_steps: {steps}",
                "lr: 3e-3",
                f"lr_reference_batch: {micro_batch}",
                "warmup_steps: 2",
                f"save_every: {steps}",
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
        "seeds": [0],
        "eval": {"suite": ["understanding", "generation"], "every_steps": 0},
        "resources": {"num_cpus": 1},
    }
    path = root / "grid.yaml"
    path.write_text(
        "# Written by `vpit demo`; re-run with: vpit grid run THIS (finished cells are skipped)\n"
        + yaml.safe_dump(grid, sort_keys=False, default_flow_style=None),
        encoding="utf-8",
    )
    return path


def grid_stage(
    out: str | Path, *, steps: int = 30, micro_batch: int = 8, ray_address: str | None = None
) -> dict[str, Any]:
    """Write, plan, run and report the demo grid; return the report's files and results rows."""
    from vpit.grid.report import write_report
    from vpit.grid.run import collect_rows, run_grid
    from vpit.grid.spec import expand, load_grid
    from vpit.mixtures import load_spec, make_plan

    out = Path(out)
    groups = dict(make_plan(load_spec(out / "mixtures" / "demo.yaml")).groups)
    u, g = groups["understanding"], groups["generation"]
    axes = {"understanding": [max(1, u // 4), u], "generation": [max(1, g // 4), g]}
    # Every cell trains the same number of steps, at most one pass over the smallest cell's mixture
    # (nothing repeats), so the cells differ in what their batches hold, not in compute.
    smallest = min(
        u_n + g_n + sum(n for k, n in groups.items() if k not in ("understanding", "generation"))
        for u_n in axes["understanding"]
        for g_n in axes["generation"]
    )
    steps = max(1, min(steps, smallest // micro_batch))
    path = write_demo_grid(out, steps=steps, micro_batch=micro_batch, **axes)
    spec = load_grid(path)
    print(
        f"    wrote {path} (+ base.yaml, train.yaml: {steps} steps of {micro_batch} per cell)\n    vpit grid run {path}"
    )
    for cell in expand(spec):  # an infeasible cell fails here, before anything trains
        plan = make_plan(load_spec(spec.base, cell.overrides))
        print(f"      {cell.id:<56} {plan.total:>5} samples  plan {plan.hash}")
    grid_out = path.parent / f"{spec.name}-grid"
    result = run_grid(spec, grid_out, ray_address=ray_address)
    print("\n".join("    " + line for line in result.summary().splitlines()))
    rows, failed = collect_rows(grid_out, spec)
    if not rows:
        raise RuntimeError(f"every grid cell failed; see {grid_out}/cells/*/train.log")
    files = write_report(grid_out / "report", rows, list(spec.axes), {a: list(v) for a, v in spec.axes.items()}, failed)
    metrics = ("understanding/exact_match", "generation/cosine", "generation/retrieval")
    print(
        "\n    "
        + "".join(f"{a.split('.')[-2]:>15}" for a in spec.axes)
        + "".join(f"{m.split('/')[-1]:>13}" for m in metrics)
    )
    for r in rows:
        print(
            "    "
            + "".join(f"{r[a]:>15}" for a in spec.axes)
            + "".join(f"{r[m]:>13.3f}" if isinstance(r.get(m), float) else f"{'-':>13}" for m in metrics)
        )
    print(f"    report {files['markdown']} ({sum(1 for k in files if k.startswith('heatmap:'))} heatmaps)")
    return {
        "grid": str(path),
        "out": str(grid_out),
        "steps": steps,
        "axes": {a: list(v) for a, v in spec.axes.items()},
        "rows": rows,
        "failed": failed,
        "files": {k: str(v) for k, v in files.items()},
    }
