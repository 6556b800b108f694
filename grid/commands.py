"""`vpit grid plan|run|report`: the commands and their printed summaries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vpit.common import text_table
from vpit.config import Command, Group, path_field
from vpit.errors import ConfigError
from vpit.grid.spec import GridSpec, expand

__all__ = ["grid", "plan_grid", "write_grid_report"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GridOutput:
    output: str | None = path_field(None)
    """Grid folder; default: <name>-grid beside the grid's base mixture spec."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GridJob:
    ray_address: str | None = None
    """Ray cluster to use; default: RAY_ADDRESS, else a local Ray."""
    optimum: bool = False
    """After the grid, run the mixing laws' best split of optimum.budget as one more cell (every seed)
    and report its predicted against its measured metrics."""


def plan_grid(spec: GridSpec) -> str:
    """Plan every cell's mixture; raise one error listing every infeasible cell."""
    from vpit.mixtures import load_spec, make_plan

    rows, problems = [], []
    for cell in expand(spec):
        try:
            plan = make_plan(load_spec(spec.base, cell.overrides))
        except ValueError as e:
            problems.append(f"{cell.id}: " + str(e).replace("\n", "\n    "))
            continue
        rows.append((cell.id, *(str(cell.values[a]) for a in spec.axes), f"{plan.total:,}", plan.hash))
    if problems:
        raise ConfigError(f"{len(problems)} infeasible cell(s) in {spec.name}:\n  " + "\n  ".join(problems))
    return "\n".join(text_table(("cell", *spec.axes, "total", "plan hash"), rows, left=1))


def _out(spec: GridSpec, where: GridOutput) -> Path:
    return Path(where.output) if where.output else Path(spec.base).parent / f"{spec.name}-grid"


def write_grid_report(spec: GridSpec, out: Path) -> dict:
    import numpy as np

    from vpit.grid.report import write_report
    from vpit.grid.run import collect_optimum, collect_rows, law_metrics

    rows, failed = collect_rows(out, spec)
    if not rows:
        raise ConfigError(f"{out}: no finished cell yet; run `vpit grid run` first")
    opt = collect_optimum(out)
    measured = {k: float(np.mean([r[k] for r in opt])) for k in (opt[0] if opt else {}) if isinstance(opt[0][k], float)}
    optimum = {"budget": spec.optimum.budget, "weight": spec.optimum.weight, "measured": measured or None}
    und, gen = law_metrics(spec, rows)
    files = write_report(
        out / "report",
        rows,
        list(spec.axes),
        {a: list(v) for a, v in spec.axes.items()},
        failed,
        optimum=optimum,
        law_metrics=(und, gen) if und and gen else None,
    )
    (out / "report" / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}, indent=1))
    return files


def _print_report(spec: GridSpec, out: Path) -> None:
    report = write_grid_report(spec, out)
    print(
        f"report    {report['markdown']}  ({len(expand(spec))} cells; results.csv, "
        f"{sum(1 for k in report if k.startswith('heatmap:'))} heatmaps"
        + (", laws.json, pareto.png" if "laws" in report else "")
        + ")"
    )
    text = report["markdown"].read_text(encoding="utf-8")
    if "## Findings" in text:
        print("findings")
        print(
            "\n".join(
                "  " + line[2:] for line in text.split("## Findings", 1)[1].split("\n## ")[0].splitlines() if line
            )
        )


def run_optimum(spec: GridSpec, out: Path, ray_address: str | None) -> str:
    """Fit the laws on the finished cells, run their best split as one more cell per seed."""
    from vpit.grid.run import collect_rows, optimum_cells, run_grid
    from vpit.mixtures import load_spec, make_plan

    rows, _ = collect_rows(out, spec)
    best, cells = optimum_cells(spec, rows)
    make_plan(load_spec(spec.base, cells[0].overrides))  # infeasible: says so before training
    result = run_grid(spec, out, ray_address=ray_address, cells=cells)
    return (
        f"optimum   {', '.join(f'{a} = {n:,}' for a, n in best.counts.items())} of {best.budget:,} for "
        f"{best.objective}; predicted "
        + ", ".join(f"{m} {v:.3f}" for m, v in best.predicted.items())
        + f"\n{result.summary()}"
    )


def _run(spec: GridSpec, where: GridOutput, job: GridJob) -> None:
    from vpit.grid.run import run_grid

    plan_grid(spec)  # an infeasible cell fails here, before anything trains
    out = _out(spec, where)
    result = run_grid(spec, out, ray_address=job.ray_address)
    print(result.summary())
    if result.stopped:  # SIGTERM/SIGUSR1: the cells checkpointed and stopped; no report of a partial grid
        from vpit.errors import Terminated

        raise Terminated()
    if result.failed and not (result.finished or result.skipped):  # nothing to report: say why, in one line
        from vpit.common import raise_if_disk_full

        raise_if_disk_full(out)  # the cells could not even write their error.txt
        cell, error = next(iter(result.failed.items()))
        last = (error.strip().splitlines() or ["(no message)"])[-1]
        raise ConfigError(f"every cell failed ({len(result.failed)}); the first, {cell}: {last}")
    if job.optimum:
        print(run_optimum(spec, out, job.ray_address))
    _print_report(spec, out)


grid = Group(
    summary="mixture ablation grids: plan, run on Ray, report",
    description="Mixture ablation grids: a base mixture, axes of dotted overrides (e.g. groups.understanding.count: "
    "[1M, 4M, 7M]), a training config and seeds. `plan` checks every cell before anything runs; `run` trains and "
    "evaluates each cell as a Ray task (re-runs skip finished cells and resume interrupted ones); `report` writes "
    "the table, heatmaps and summary.",
    commands={
        "plan": Command(
            summary="expand the grid and plan every cell's mixture; writes nothing",
            run=lambda spec: print(plan_grid(spec)),
            configs=(GridSpec,),
            config_arg="GRID",
        ),
        "run": Command(
            summary="train + evaluate every unfinished cell on Ray, then write the report",
            run=_run,
            configs=(GridSpec, GridOutput, GridJob),
            config_arg="GRID",
            short={"output": "-o"},
        ),
        "report": Command(
            summary="results.csv/.parquet, heatmap PNGs, correlation PNG, report.md",
            run=lambda spec, where: _print_report(spec, _out(spec, where)),
            configs=(GridSpec, GridOutput),
            config_arg="GRID",
            short={"output": "-o"},
        ),
    },
)
