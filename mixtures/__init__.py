"""Declarative mixtures: spec (YAML) -> plan (exact counts) -> deterministic, resumable stream."""

from mixtures.heldout import heldout_items
from mixtures.load import load_spec
from mixtures.plan import Plan, SourcePlan, make_plan
from mixtures.spec import GroupSpec, MixtureSpec, SourceSpec
from mixtures.stream import MixtureStream

__all__ = ["GroupSpec", "MixtureSpec", "MixtureStream", "Plan", "SourcePlan", "SourceSpec", "heldout_items",
           "load_spec", "make_plan"]
