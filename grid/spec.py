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
    optimum: {budget: 5M, weight: 0.5}      # the mixing law's best split of 5M samples

Expansion is the cartesian product in axis order, then seeds; each cell has a stable,
readable id that names its folder, so a re-run finds the cells it already finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any, Literal

from vpit.config import load, path_field
from vpit.errors import ConfigError
from vpit.mixtures.spec import parse_count

__all__ = ["Cell", "GridEval", "GridOptimum", "GridResources", "GridSpec", "expand", "load_grid"]

SUITES = ("understanding", "generation")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GridEval:
    suite: tuple[Literal["understanding", "generation"], ...] = SUITES
    """Evaluation suites run at the end of every cell."""
    every_steps: int = 0
    """Also evaluate every K training steps (0: only at the end)."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps: expected >= 0, got {self.every_steps}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GridResources:
    num_cpus: float = 1
    """CPUs each cell's Ray task reserves."""
    num_gpus: float = 0
    """GPUs each cell's Ray task reserves (the trainer uses all it is given)."""

    def __post_init__(self):
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ConfigError(
                f"resources: expected num_cpus > 0 and num_gpus >= 0, got {self.num_cpus}, {self.num_gpus}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GridOptimum:
    budget: int | str | None = None
    """Total samples of the two count axes to split, e.g. 5M (`vpit grid run --optimum`); default: the
    largest cell's."""
    weight: float = 0.5
    """Weight of the understanding metric in the objective; the generation metric gets the rest."""
    understanding: str | None = None
    """Understanding metric of the law and the Pareto front; default: understanding/exact_match."""
    generation: str | None = None
    """Generation metric; default: generation/judge/colour_at_position when shapes-world prompts were
    judged, else generation/cosine."""

    def __post_init__(self):
        if self.budget is not None:
            object.__setattr__(self, "budget", parse_count(self.budget, "optimum.budget"))
        if not 0 <= self.weight <= 1:
            raise ConfigError(f"optimum.weight: expected a number in [0, 1], got {self.weight}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GridSpec:
    name: str
    """Grid name: the default output folder is `<name>-grid` beside the grid YAML."""
    base: str = path_field()
    """Base mixture spec; every cell is this spec with the cell's axis values applied."""
    train: str = path_field()
    """Training config for `vpit train` (model, batch sizes, steps...)."""
    axes: dict[str, list[Any]]
    """Dotted path into the mixture spec -> values, e.g. groups.generation.count: [200k, 1M]."""
    seeds: tuple[int, ...] = (0,)
    """Repeats: each seed is a separate run of every cell."""
    eval: GridEval = dataclasses.field(default_factory=GridEval)
    """What each cell evaluates, and when."""
    resources: GridResources = dataclasses.field(default_factory=GridResources)
    """What each cell's Ray task reserves."""
    optimum: GridOptimum = dataclasses.field(default_factory=GridOptimum)
    """The mixing law's objective and budget (`vpit grid report`, `vpit grid run --optimum`)."""

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
        for field in ("base", "train"):
            if not Path(getattr(self, field)).is_file():
                problems.append(f"{field}: {getattr(self, field)!r} is not a file")
        if problems:
            raise ConfigError("invalid grid spec:\n  " + "\n  ".join(problems))


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


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> GridSpec:
    """A grid YAML (base and train resolve against its folder) with dotted `overrides`."""
    return load((GridSpec,), config=path, sets=list((overrides or {}).items()))[0]


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
