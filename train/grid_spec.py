"""The grid spec: a base mixture, axes of dotted-path overrides, a training config, seeds.

    name: vqa-x-gen
    base: mixture.yaml                      # a mixture spec (paths relative to this file)
    train: train.yaml                       # a training config for `vpit train`
    axes:
      groups.understanding.count: [1M, 4M, 7M]
      groups.generation.count: [200k, 1M, 4M]
    seeds: [0, 1]                           # repeats: the mixture and training seed
    eval: {suite: [understanding, generation], every_steps: 0}
    resources: {num_cpus: 1, num_gpus: 0}   # what each cell's Ray task asks for

Expansion is the cartesian product in axis order, then seeds; each cell has a stable,
readable id that names its folder, so a re-run finds the cells it already finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Cell", "GridSpec", "expand", "load_grid"]

SUITES = ("understanding", "generation")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GridSpec:
    name: str
    """Grid name: the default output folder is `<name>-grid` beside the grid YAML."""
    base: Path
    """Base mixture spec; every cell is this spec with the cell's axis values applied."""
    train: Path
    """Training config for `vpit train` (model, batch sizes, steps...)."""
    axes: dict[str, list[Any]]
    """Dotted path into the mixture spec -> values, e.g. groups.generation.count: [200k, 1M]."""
    seeds: tuple[int, ...] = (0,)
    """Repeats: each seed is a separate run of every cell."""
    suite: tuple[str, ...] = SUITES
    """Evaluation suites run at the end of every cell."""
    every_steps: int = 0
    """Also evaluate every K training steps (0: only at the end)."""
    num_cpus: float = 1
    """CPUs each cell's Ray task reserves."""
    num_gpus: float = 0
    """GPUs each cell's Ray task reserves (the trainer uses all it is given)."""

    def __post_init__(self):
        problems = []
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            problems.append(f"name: expected letters, digits, '-', '_' or '.', got {self.name!r}")
        if not self.axes:
            problems.append("axes: expected at least one axis (a dotted path with a list of values)")
        for path, values in self.axes.items():
            if not isinstance(values, list) or not values:
                problems.append(f"axes.{path}: expected a non-empty list of values, got {values!r}")
            elif len(set(map(str, values))) != len(values):
                problems.append(f"axes.{path}: values repeat: {values}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds: expected a non-empty list of distinct integers, got {list(self.seeds)}")
        for s in self.suite:
            if s not in SUITES:
                problems.append(f"eval.suite: unknown suite {s!r}; choose from {list(SUITES)}")
        if self.every_steps < 0:
            problems.append(f"eval.every_steps: expected >= 0, got {self.every_steps}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            problems.append(f"resources: expected num_cpus > 0 and num_gpus >= 0, got {self.num_cpus}, {self.num_gpus}")
        for field in ("base", "train"):
            if not getattr(self, field).is_file():
                problems.append(f"{field}: {str(getattr(self, field))!r} is not a file")
        if problems:
            raise ValueError("invalid grid spec:\n  " + "\n  ".join(problems))


@dataclasses.dataclass(frozen=True, slots=True)
class Cell:
    id: str
    """Folder name: index, axis values and seed, e.g. c01_understanding.count=1M_generation.count=200k_s0."""
    values: dict[str, Any]
    """Axis path -> value for this cell."""
    seed: int

    @property
    def overrides(self) -> dict[str, Any]:
        """Mixture-spec overrides: the axis values and the seed."""
        return {**self.values, "seed": self.seed}


_KEYS = {"name", "base", "train", "axes", "seeds", "eval", "resources"}


def load_grid(path: str | Path) -> GridSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"grid spec {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    for key in ("name", "base", "train", "axes"):
        if key not in raw:
            raise ValueError(f"{path}: missing required key {key!r}")
    ev, res = raw.get("eval") or {}, raw.get("resources") or {}
    for where, d, allowed in (("eval", ev, {"suite", "every_steps"}), ("resources", res, {"num_cpus", "num_gpus"})):
        if not isinstance(d, dict) or set(d) - allowed:
            raise ValueError(f"{path}: {where}: expected a mapping with keys from {sorted(allowed)}, got {d!r}")
    if not isinstance(raw["axes"], dict):
        raise ValueError(f"{path}: axes: expected a mapping of dotted path -> list of values")
    return GridSpec(
        name=str(raw["name"]),
        base=(path.parent / raw["base"]).resolve(),
        train=(path.parent / raw["train"]).resolve(),
        axes=dict(raw["axes"]),
        seeds=tuple(int(s) for s in raw.get("seeds", [0])),
        suite=tuple(ev.get("suite", SUITES)),
        every_steps=int(ev.get("every_steps", 0)),
        num_cpus=float(res.get("num_cpus", 1)),
        num_gpus=float(res.get("num_gpus", 0)),
    )


def _short(path: str) -> str:
    parts = path.split(".")
    return ".".join(parts[-2:])


def expand(spec: GridSpec) -> list[Cell]:
    """Every (axis values, seed) combination in a fixed order, with a folder-safe id."""
    cells = []
    paths = list(spec.axes)
    for i, combo in enumerate(itertools.product(*(spec.axes[p] for p in paths))):
        label = "_".join(f"{_short(p)}={v}" for p, v in zip(paths, combo))
        label = re.sub(r"[^A-Za-z0-9_.=-]", "-", label)
        for seed in spec.seeds:
            cells.append(Cell(id=f"c{i:02d}_{label}_s{seed}", values=dict(zip(paths, combo)), seed=seed))
    return cells
