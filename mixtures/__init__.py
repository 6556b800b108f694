"""Declarative mixtures: spec (YAML) -> plan (exact counts) -> deterministic, resumable stream."""

from vpit.mixtures.heldout import heldout_items
from vpit.mixtures.load import load_spec
from vpit.mixtures.plan import Plan, SourcePlan, make_plan
from vpit.mixtures.spec import GroupSpec, MixtureSpec, SourceSpec
from vpit.mixtures.stream import MixtureStream

__all__ = [
    "GroupSpec",
    "MixtureSpec",
    "MixtureStream",
    "Plan",
    "SourcePlan",
    "SourceSpec",
    "heldout_items",
    "load_spec",
    "make_plan",
]
