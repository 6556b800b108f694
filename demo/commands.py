"""`vpit demo`: the whole pipeline on generated shapes-world data, then a report."""

from __future__ import annotations

import dataclasses

from vpit.config import Command, path_field
from vpit.demo.run import QUICK, DemoConfig, run_demo

__all__ = ["demo"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DemoOutput:
    output: str = path_field("demo-out")
    """Folder for everything the demo writes."""


demo = Command(
    summary="run the whole pipeline on generated shapes-world data",
    description="Run the whole pipeline on generated shapes-world data, in nine stages: generate raw data of all "
    "four kinds, ingest, precompute visual tokens, plan a mixture, train a small VPiT model, evaluate it on the "
    "held-out split, run a 3x3 mixture grid with 2 seeds on Ray (findings, mixing law, its optimum), train the "
    "diffusion decoder, and generate and judge images from unseen prompts. About 9.5 minutes on a 2-core CPU "
    "(--quick: about 3). Writes OUTPUT/report.html (and report.md) with the ingest counts, the mixture plan, loss "
    "curves, metrics, grid heatmaps with their spread, the Pareto plot and a judged gallery.",
    run=lambda cfg, where: run_demo(where.output, cfg),
    configs=(DemoConfig, DemoOutput),
    short={"output": "-o"},
    presets={"quick": ("a shortened demo: less data, fewer steps, the same stages", QUICK)},
)
