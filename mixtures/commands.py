"""`vpit mix plan` and `vpit mix inspect`: a mixture spec's plan table, and its realised batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vpit.config import Command, Group, path_field

__all__ = ["mix"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MixPlanConfig:
    spec: str = path_field()
    """Mixture spec YAML."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dotted overrides of the spec (--set groups.generation.count=200k, --set phases.stage2.total=1M)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MixPlanOptions:
    batch_size: int | None = None
    """Global batch size: show each phase's steps and plot the group shares per step."""
    png: str | None = path_field(None)
    """With --batch-size: the share plot to write; default: the spec's name + .shares.png beside it."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MixInspectConfig:
    batch_size: int
    """Global batch size (all ranks, one step)."""
    steps: int = 20
    """Global batches to read."""
    png: str | None = path_field(None)
    """Plot to write; default: the spec's name + .ratio.png beside it."""
    lineage: str | None = path_field(None)
    """Also write the sample ids of each inspected step here, one JSON line per step."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            from vpit.errors import ConfigError

            raise ConfigError(f"steps, batch_size: expected >= 1, got {self.steps}, {self.batch_size}")


def _plan(cfg: MixPlanConfig):
    from vpit.mixtures import load_spec, make_plan

    return make_plan(load_spec(cfg.spec, cfg.overrides or None))


def _print_plan(cfg: MixPlanConfig, opts: MixPlanOptions) -> None:
    plan = _plan(cfg)
    print(plan.table(opts.batch_size))
    if opts.batch_size:
        from vpit.mixtures.inspect import plot_group_ratio
        from vpit.mixtures.sampler import make_schedule

        spec = Path(cfg.spec)
        png = plot_group_ratio(
            plan,
            make_schedule(plan, opts.batch_size),
            Path(opts.png) if opts.png else spec.with_name(spec.stem + ".shares.png"),
        )
        print(f"\nwrote {png} (each group's share per step against the plan)")


def _inspect(cfg: MixPlanConfig, opts: MixInspectConfig) -> None:
    from vpit.mixtures.inspect import inspect_mixture

    spec = Path(cfg.spec)
    png = Path(opts.png) if opts.png else spec.with_name(spec.stem + ".ratio.png")
    print(
        inspect_mixture(
            _plan(cfg),
            batch_size=opts.batch_size,
            steps=opts.steps,
            png=png,
            lineage=Path(opts.lineage) if opts.lineage else None,
        )
    )


mix = Group(
    summary="plan and inspect mixture specs (exact counts, per-batch ratios)",
    description="Mixture specs (YAML: sources, per-group counts or weights, split, seed, repetition, token cache; "
    "see README 'Mixtures'). `--set KEY=VALUE` overrides a key of the spec.",
    commands={
        "plan": Command(
            summary="validate a spec and print its plan table (with --batch-size: steps and a share plot)",
            description="Validate SPEC, resolve its datasets and print per-source available/planned counts, "
            "repetition, estimated text and visual tokens, group ratios, the phases and the plan hash. An "
            "infeasible spec fails here with what to change. With --batch-size it shows each phase's steps and "
            "writes a PNG of every group's share per step against the plan.",
            run=_print_plan,
            configs=(MixPlanConfig, MixPlanOptions),
            positional=("spec",),
            set_into="overrides",
        ),
        "inspect": Command(
            summary="realised composition of the first N global batches + ratio PNG",
            description="Read the first N global batches through the mixture stream, print each group's count "
            "per batch against the plan, and write a PNG of the cumulative group ratio over the run (and "
            "optionally the sample ids of every step).",
            run=_inspect,
            configs=(MixPlanConfig, MixInspectConfig),
            positional=("spec",),
            set_into="overrides",
        ),
    },
)
