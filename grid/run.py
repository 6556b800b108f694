"""`vpit grid run`: every cell of a grid trains and evaluates as its own Ray task.

A cell's task launches the ordinary trainer (`vpit train`, under torchrun when it holds
more than one GPU) as a subprocess with the cell's mixture overrides; the trainer evaluates
its live model at the last step on the cell's own devices, and the task writes `result.json`
from that evaluation, last: that file is the cell's completion marker. A re-run
skips cells with a result, resumes the others from their latest checkpoint (`--resume`),
and a cell that fails is reported without stopping the rest. The same code runs on a local
Ray here and on a cluster through `--ray-address`.

Layout of a grid folder:

    grid.json                      the resolved grid spec
    cells/<cell id>/cell.json      the cell's axis values, seed, overrides
    cells/<cell id>/run/           the training run (checkpoints, metrics.jsonl, loss.png, eval/)
    cells/<cell id>/result.json    final metrics, written last
    cells/<cell id>/error.txt      why it failed (the end of the trainer's output)
    report/                        results table, heatmaps, correlation plot, report.md
    STOP                           written when the runner gets SIGTERM/SIGUSR1: every cell's task
                                   passes the signal on to its trainer, which checkpoints and exits

Pre-emption reaches the runner (the Ray driver), not the cells' processes, which Ray starts on
any node: the runner writes STOP in the shared grid folder, each task polls for it and signals
its trainer; a re-run (which removes STOP) resumes every unfinished cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from vpit.common import init_ray, save_json_atomic, subprocess_env, vpit_argv
from vpit.grid.spec import Cell, GridSpec, expand

__all__ = [
    "GridRun",
    "collect_optimum",
    "collect_rows",
    "optimum_budget",
    "optimum_cells",
    "run_grid",
    "train_and_eval_cell",
]

STOP = "STOP"


class CellStopped(Exception):
    """The cell's trainer checkpointed and stopped on a forwarded pre-emption signal."""


@dataclasses.dataclass
class GridRun:
    out: Path
    finished: list[str]
    skipped: list[str]
    failed: dict[str, str]
    seconds: float
    stopped: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"grid      {self.out}",
            f"cells     {len(self.finished) + len(self.skipped) + len(self.failed)}: {len(self.finished)} run now, "
            f"{len(self.skipped)} already finished, {len(self.failed)} failed"
            + (
                f", {len(self.stopped)} stopped by a signal (re-run the command to resume them)" if self.stopped else ""
            ),
            f"time      {self.seconds:.0f}s",
        ]
        lines += [
            f"  FAILED {cell}: {_last_line(err)}  (see cells/{cell}/train.log)" for cell, err in self.failed.items()
        ]
        return "\n".join(lines)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def train_and_eval_cell(spec: GridSpec, cell: Cell, cell_dir: Path, gpus: int = 0) -> dict[str, Any]:
    """Train (or resume) one cell, evaluating at its last step, and write result.json. Raises with
    the trainer's output tail on failure, CellStopped when GRID/STOP appeared and the trainer
    checkpointed and stopped. Pure function of (spec, cell): it can run on any node."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "cell.json").write_text(
        json.dumps({"id": cell.id, "values": cell.values, "seed": cell.seed, "overrides": cell.overrides}, indent=1)
        + "\n"
    )
    run_dir = cell_dir / "run"
    sets = {
        "output_dir": str(run_dir),
        "data.mixture": str(spec.base),
        "data.mixture_overrides": cell.overrides,
        "seed": cell.seed,
        "eval_every": spec.eval.every_steps,
        "eval_at_end": True,
        "eval_suite": list(spec.eval.suite),
    }
    args = ["train", str(spec.train), "--resume"] + [f"--set={k}={json.dumps(v)}" for k, v in sets.items()]
    log = cell_dir / "train.log"
    # A cell is its own world: it never inherits the rendezvous of the process that launched it.
    env = subprocess_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    stop_file = cell_dir.parent.parent / STOP
    with open(log, "ab") as f:
        proc = subprocess.Popen(vpit_argv(*args, nproc=gpus), cwd=cell_dir, env=env, stdout=f, stderr=subprocess.STDOUT)
        signalled = False
        while proc.poll() is None:
            if not signalled and stop_file.exists():
                proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
                signalled = True
            time.sleep(0.5)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        (cell_dir / "error.txt").write_text(tail)
        raise RuntimeError(f"training exited with {proc.returncode}:\n{tail}")
    evals = sorted((run_dir / "eval").glob("step-*.json"))
    if signalled or not evals:
        raise CellStopped(cell.id)
    metrics = json.loads(evals[-1].read_text())
    metrics.pop("step", None)
    result = {"cell": cell.id, "seed": cell.seed, **cell.values, **metrics}
    save_json_atomic(cell_dir / "result.json", result)
    (cell_dir / "error.txt").unlink(missing_ok=True)
    return result


def collect_rows(out: Path, spec: GridSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results of finished cells, failed cells) in expansion order."""
    rows, failed = [], []
    for cell in expand(spec):
        d = out / "cells" / cell.id
        if (d / "result.json").is_file():
            rows.append(json.loads((d / "result.json").read_text()))
        elif (d / "error.txt").is_file():
            failed.append({"cell": cell.id, "error": _last_line((d / "error.txt").read_text(errors="replace"))})
    return rows, failed


def law_metrics(spec: GridSpec, rows: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    from vpit.grid.report import key_metrics

    und, gen = key_metrics(rows)
    return spec.optimum.understanding or und, spec.optimum.generation or gen


def optimum_cells(spec: GridSpec, rows: list[dict[str, Any]]) -> tuple[Any, list[Cell]]:
    """The mixing laws' best split of the budget, as one cell per seed (ids optimum_...)."""
    from vpit.errors import ConfigError
    from vpit.grid import law as L

    axes = list(spec.axes)
    und, gen = law_metrics(spec, rows)
    if len(axes) != 2 or not (und and gen):
        raise ConfigError("--optimum needs a grid over two count axes with an understanding and a generation metric")
    laws = (L.fit_law(rows, axes, und), L.fit_law(rows, axes, gen))
    budget, bounds = optimum_budget(spec)
    best = L.optimum(laws, budget, spec.optimum.weight, bounds)
    label = "_".join(f"{a.split('.')[-2] if '.' in a else a}={n}" for a, n in best.counts.items())
    return best, [Cell(id=f"optimum_{label}_s{seed}", values=dict(best.counts), seed=seed) for seed in spec.seeds]


def optimum_budget(spec: GridSpec) -> tuple[int, tuple[tuple[int, int], tuple[int, int]]]:
    """(budget, each axis's measured range): optimum.budget, or by default the middle cell's total, so
    that the split has room on both axes within the range the grid measured."""
    from vpit.grid import law as L

    counts = [sorted(L.axis_counts(list(v), a)) for a, v in spec.axes.items()]
    bounds = tuple((c[0], c[-1]) for c in counts)
    return int(spec.optimum.budget or sum(c[len(c) // 2] for c in counts)), bounds


def collect_optimum(out: Path) -> list[dict[str, Any]]:
    """Results of the optimum's cells (`vpit grid run --optimum`), if any."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("cells/optimum_*/result.json"))]


def run_grid(
    spec: GridSpec,
    out: str | Path,
    *,
    ray_address: str | None = None,
    progress: bool = True,
    cells: list[Cell] | None = None,
) -> GridRun:
    """Run every unfinished cell of `spec` (or the given `cells`) as Ray tasks. One runner per grid
    folder: a second `vpit grid run` on it stops at once, naming the first."""
    from vpit.lock import FolderLock

    with FolderLock(out, "vpit grid run"):
        return _run_cells(spec, Path(out), ray_address, progress, cells)


def _run_cells(spec: GridSpec, out: Path, ray_address: str | None, progress: bool, cells: list[Cell] | None) -> GridRun:
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / STOP).unlink(missing_ok=True)  # a re-run after a pre-emption resumes
    (out / "grid.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1, default=str) + "\n")
    cells = expand(spec) if cells is None else cells
    skipped = [c.id for c in cells if (out / "cells" / c.id / "result.json").is_file()]
    todo = [c for c in cells if c.id not in skipped]
    finished, failed, stopped = [], {}, []
    if todo:
        init_ray(ray_address)
        task = ray.remote(train_and_eval_cell).options(
            num_cpus=spec.resources.num_cpus, num_gpus=spec.resources.num_gpus, max_retries=0
        )
        pending = {task.remote(spec, c, out / "cells" / c.id, int(spec.resources.num_gpus)): c for c in todo}
        bar = tqdm(total=len(cells), initial=len(skipped), desc="grid cells", unit="cell", disable=not progress)
        with _forward_signals(out / STOP):
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(done[0])
                try:
                    ray.get(done[0])
                    finished.append(cell.id)
                except Exception as e:  # a failed cell is reported; the others go on
                    if isinstance(getattr(e, "cause", None), CellStopped) or (out / STOP).exists():
                        stopped.append(cell.id)
                        continue
                    err = out / "cells" / cell.id / "error.txt"
                    failed[cell.id] = err.read_text(errors="replace") if err.is_file() else f"{type(e).__name__}: {e}"
                bar.update(1)
        bar.close()
    return GridRun(
        out=out, finished=finished, skipped=skipped, failed=failed, stopped=stopped, seconds=time.perf_counter() - t0
    )


@contextlib.contextmanager
def _forward_signals(stop_file: Path):
    """SIGTERM/SIGUSR1 to the runner -> STOP in the grid folder, which every cell's task watches."""

    def handler(signum, frame):
        stop_file.write_text(signal.Signals(signum).name + "\n")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
