"""`vpit eval` and `vpit grid plan|run|report`: argument parsing and the printed summaries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["build_eval", "build_grid", "cmd_eval", "cmd_grid"]


def _suite(text: str) -> tuple[str, ...]:
    suite = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in suite if s not in ("understanding", "generation")]
    if bad or not suite:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {bad}; use understanding, generation or both")
    return suite


def build_eval(p: argparse.ArgumentParser) -> None:
    p.description = ("Evaluate a training run (its latest checkpoint) or a checkpoint folder on the held-out split "
                     "of its mixture (the spec's `heldout` fraction, chosen by id hash, never trained on). Writes "
                     "RUN/eval/step-N.json. Understanding: exact match / multiple choice, per-source text loss. "
                     "Generation: token cosine, retrieval accuracy, Fréchet distance in the token space.")
    p.add_argument("checkpoint", help="run folder (output_dir of vpit train) or one of its checkpoints")
    p.add_argument("--suite", type=_suite, default=("understanding", "generation"),
                   help="comma-separated: understanding,generation (default: both)")
    p.add_argument("--max-per-source", type=int, default=64, help="held-out samples per source (default: 64)")


def cmd_eval(args: argparse.Namespace) -> None:
    from train.evaluate import evaluate_run

    metrics = evaluate_run(args.checkpoint, suite=args.suite, max_per_source=args.max_per_source)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def build_grid(p: argparse.ArgumentParser) -> None:
    p.description = ("Mixture ablation grids: a base mixture, axes of dotted overrides (e.g. "
                     "groups.understanding.count: [1M, 4M, 7M]), a training config and seeds. `plan` checks every "
                     "cell before anything runs; `run` trains and evaluates each cell as a Ray task (re-runs skip "
                     "finished cells and resume interrupted ones); `report` writes the table, heatmaps and summary.")
    sub = p.add_subparsers(dest="grid_command", required=True, metavar="ACTION")
    for name, text in (("plan", "expand the grid and plan every cell's mixture; writes nothing"),
                       ("run", "train + evaluate every unfinished cell on Ray, then write the report"),
                       ("report", "results.csv/.parquet, heatmap PNGs, correlation PNG, report.md")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("grid", help="grid spec YAML")
        if name != "plan":
            q.add_argument("--output", "-o", default=None, help="grid folder (default: <name>-grid beside the YAML)")
        if name == "run":
            q.add_argument("--ray-address", default=None, help="Ray cluster to use; default: RAY_ADDRESS or a local Ray")


def _out(args: argparse.Namespace, spec) -> Path:
    return Path(args.output) if args.output else Path(args.grid).resolve().parent / f"{spec.name}-grid"


def cmd_grid(args: argparse.Namespace) -> None:
    from train.grid_spec import expand, load_grid

    spec = load_grid(args.grid)
    if args.grid_command == "plan":
        print(plan_grid(spec))
        return
    out = _out(args, spec)
    if args.grid_command == "run":
        from train.grid import run_grid

        plan_grid(spec)  # an infeasible cell fails here, before anything trains
        result = run_grid(spec, out, ray_address=args.ray_address)
        print(result.summary())
    report = write_grid_report(spec, out)
    print(f"report    {report['markdown']}  ({len(expand(spec))} cells; results.csv, "
          f"{sum(1 for k in report if k.startswith('heatmap:'))} heatmaps)")


def plan_grid(spec) -> str:
    """Plan every cell's mixture; raise one error listing every infeasible cell."""
    from mixtures import load_spec, make_plan
    from train.grid_spec import expand

    lines, problems = [], []
    axes = list(spec.axes)
    lines.append("cell".ljust(48) + "".join(a[-15:].rjust(16) for a in axes) + "   total  plan hash")
    for cell in expand(spec):
        try:
            plan = make_plan(load_spec(spec.base, cell.overrides))
        except ValueError as e:
            problems.append(f"{cell.id}: " + str(e).replace("\n", "\n    "))
            continue
        lines.append(cell.id[:47].ljust(48) + "".join(str(cell.values[a]).rjust(16) for a in axes)
                     + f"{plan.total:>8}  {plan.hash}")
    if problems:
        raise ValueError(f"{len(problems)} infeasible cell(s) in {spec.name}:\n  " + "\n  ".join(problems))
    return "\n".join(lines)


def write_grid_report(spec, out: Path) -> dict:
    from train.grid import collect_rows
    from train.grid_report import write_report

    rows, failed = collect_rows(out, spec)
    if not rows:
        raise ValueError(f"{out}: no finished cell yet; run `vpit grid run` first")
    files = write_report(out / "report", rows, list(spec.axes), {a: list(v) for a, v in spec.axes.items()}, failed)
    (out / "report" / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}, indent=1))
    return files
