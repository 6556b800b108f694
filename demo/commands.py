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
    "four kinds, ingest, precompute visual tokens, plan a mixture, train a tiny VPiT model, evaluate it on the "
    "held-out split, run a 2x2 mixture grid on Ray, train the diffusion decoder, and generate images from unseen "
    "prompts. About 3 minutes on a 2-core CPU (--quick: about 2). Writes OUTPUT/report.html (and report.md) with "
    "the ingest counts, the mixture plan, loss curves, metrics, grid heatmaps and a gallery.",
    run=lambda cfg, where: run_demo(where.output, cfg),
    configs=(DemoConfig, DemoOutput),
    short={"output": "-o"},
    presets={"quick": ("a shortened demo: less data, fewer steps, the same stages", QUICK)},
)
