"""Cluster files that ship with vpit: DeepSpeed configs, a KubeRay RayCluster/RayJob, a `ray up`
cluster, SLURM scripts. `config_file` finds one inside the installed package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["config_file"]


def config_file(*parts: str) -> Path:
    """The path of a shipped file, e.g. config_file("deepspeed", "zero3_cpu.json")."""
    return Path(str(resources.files(__name__).joinpath(*parts)))
