"""The mixture spec: YAML -> frozen, validated dataclasses.

A spec names sources (a dataset folder, an optional `kind` filter, a group), the amount
per group (exact counts, or weights with a total), how each group splits among its
sources, a seed, the repetition policy and the token-cache fingerprint. Example:

    include: base.yaml            # optional: this file's keys override the included file's
    seed: 0
    repetition: error             # error | allow
    heldout: {fraction: 0.02}     # 2% held out for evaluation only, grouped by image (see below)
    cache: 3f2a9c1e0b7d4a55       # token-cache fingerprint (vpit precompute prints it)
    sources:
      vqa:   {path: ../data/vqa, group: understanding}
      pairs: {path: ../data/pairs, group: generation, kind: generation}
    groups:
      understanding: 7M           # shorthand for {count: 7M}
      generation: {count: 200k, split: equal}

The YAML -> dataclass step is our own small checker rather than a schema library: it
needs to name the YAML path of every problem (`groups.generation.count: ...`), collect
all of them at once, and understand count suffixes and includes, which is most of the code
either way. Problems raise `ValueError` listing every bad field and what to change.

Held-out split. `heldout: {fraction: F}` (by: image, the default of this form) holds out the
samples whose id hashes below F and, with them, every sample of any source of the mixture that
shares an image with a held-out one (exact: the same sha256; `near: true` also groups
re-encoded or resized copies by their difference hash), until no training sample shares an
image with a held-out one. `heldout: F` (a bare number, the form of older specs) keeps the id
hash alone, and so its split, unless the spec opts in with the mapping.

`dedup: exact | near` leaves repeated generation targets out of training: a caption pair whose
image is a copy of an earlier one's (MetaCLIP and CC12M repeat URLs and pictures).

Phases. A mixture that changes over training lists `phases:` in order instead of top-level
`groups:`; each phase gives its own group amounts (counts, or weights + its `total`) and
optionally its own splits, and ends when its amounts are drawn. A group left out of a phase (or
given 0) takes no samples there. Sources continue their permutations across phases:

    phases:
      - name: stage1
        total: 100k
        groups: {understanding: {weight: 1}, generation: {weight: 3}}
      - name: stage2
        groups: {understanding: 500k, generation: {count: 200k, split: equal}}

`unit: tokens` makes every amount (counts and totals) a number of tokens, text tokens with the
spec's `tokenizer` plus visual tokens (images x m); the planner turns them into sample counts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from vpit.errors import ConfigError
from vpit.pipelines.sample import KINDS

__all__ = ["REPETITION", "SPLITS", "UNITS", "GroupSpec", "MixtureSpec", "PhaseSpec", "SourceSpec", "parse_count"]

SPLITS = ("proportional", "equal", "explicit")
UNITS = ("samples", "tokens")
REPETITION = ("error", "allow")
HELDOUT_BY = ("image", "id")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMB]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9}


def parse_count(value: Any, where: str) -> int:
    """A positive sample count: 200000, "200k", "7M", "1.5B" (k = 1e3, M = 1e6, B = 1e9)."""
    hint = "a positive count like 200000, 200k, 7M or 1.5B"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: expected {hint}, got {value!r}")
    if isinstance(value, str):
        m = _COUNT.match(value)
        if not m:
            raise ConfigError(f"{where}: expected {hint}, got {value!r}")
        try:
            exact = Decimal(m.group(1)) * _SUFFIX[m.group(2)]
        except InvalidOperation:
            raise ConfigError(f"{where}: expected {hint}, got {value!r}") from None
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: expected {hint}, got {value!r}")
        exact = Decimal(value)
    if exact != exact.to_integral_value():
        raise ConfigError(f"{where}: {value!r} is not a whole number of samples")
    if exact <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}; remove the group or give it a positive count")
    return int(exact)


def _check_name(name: str, where: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{where}: name {name!r} must be letters, digits, '_' or '-' (no dots: names appear in "
            "dotted override paths)"
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SourceSpec:
    """One named source: samples of a dataset folder, optionally only those of one kind."""

    name: str
    """Unique source name; appears in reports, plan tables and dotted overrides."""
    path: Path | str
    """Dataset folder (holds manifest.json), or its URL on object storage (s3://, gs://, hf://);
    relative paths in YAML are relative to the YAML file."""
    group: str
    """The group this source's samples count towards (e.g. understanding, generation)."""
    kind: str | None = None
    """Keep only samples of this kind (one of pipelines.sample.KINDS); None keeps every sample."""

    def __post_init__(self):
        _check_name(self.name, f"sources.{self.name}")
        if self.kind is not None and self.kind not in KINDS:
            raise ConfigError(f"sources.{self.name}.kind: unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GroupSpec:
    """A group's amount (an exact count or a weight of the total) and how it splits among sources."""

    name: str
    """Group name, referenced by sources' `group`."""
    count: int | None = None
    """Exact number of samples over the run (give count or weight, not both)."""
    weight: float | None = None
    """Relative weight; the spec's `total` is split among groups by weight."""
    split: str = "proportional"
    """How the amount splits among this group's sources: proportional (to size), equal, explicit."""
    shares: tuple[tuple[str, float], ...] = ()
    """For split explicit: (source, relative weight) for every source of the group."""

    def __post_init__(self):
        where = f"groups.{self.name}"
        _check_name(self.name, where)
        if (self.count is None) == (self.weight is None):
            raise ConfigError(
                f"{where}: give exactly one of count or weight (got {'both' if self.count is not None else 'neither'})"
            )
        if self.count is not None and (
            isinstance(self.count, bool) or not isinstance(self.count, int) or self.count <= 0
        ):
            raise ConfigError(f"{where}.count: must be a positive integer, got {self.count!r}")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(
                f"{where}.weight: must be > 0, got {self.weight!r}; remove the group instead of a zero weight"
            )
        if self.split not in SPLITS:
            raise ConfigError(f"{where}.split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        if (self.split == "explicit") != bool(self.shares):
            raise ConfigError(
                f"{where}.split: explicit splits need shares (write split as a mapping "
                "{source: weight}) and only they take shares"
            )
        for src, w in self.shares:
            if not (math.isfinite(w) and w > 0):
                raise ConfigError(f"{where}.split.{src}: share must be > 0, got {w!r}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PhaseSpec:
    """One phase of training: its group amounts; it ends when they are drawn."""

    name: str
    """Phase name (reports, dotted overrides `phases.NAME.groups...`)."""
    groups: tuple[GroupSpec, ...]
    """The groups this phase draws from, with their amounts (a group left out takes none)."""
    total: int | None = None
    """The phase's amount when its groups give weights."""
    absent: tuple[str, ...] = ()
    """Groups the phase names with an amount of 0 (it draws none of them)."""

    def __post_init__(self):
        _check_name(self.name, f"phases.{self.name}")


def _amount_problems(groups: tuple[GroupSpec, ...], total: int | None, where: str) -> list[str]:
    """Counts everywhere, or weights everywhere plus a total."""
    modes = {"count" if g.count is not None else "weight" for g in groups}
    if len(modes) > 1:
        return [
            f"{where}groups: mix of count and weight; give every group a count, or every group a weight plus a total"
        ]
    if modes == {"weight"} and total is None:
        return [
            f"{where}total: groups give weights but the {'phase' if where else 'spec'} has no total; "
            "add e.g. total: 1M, or give each group a count instead"
        ]
    if modes == {"count"} and total is not None:
        return [f"{where}total: only allowed with weights; with counts the total is their sum, remove total"]
    return []


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MixtureSpec:
    """A whole mixture. Cross-field problems are collected and raised together."""

    sources: tuple[SourceSpec, ...]
    """The named sources, in spec order."""
    groups: tuple[GroupSpec, ...] = ()
    """The groups and their amounts, in spec order (a spec without phases)."""
    phases: tuple[PhaseSpec, ...] = ()
    """The phases in training order; a spec without phases has one, of its groups and total."""
    unit: str = "samples"
    """samples | tokens: what every count and total counts."""
    tokenizer: str | None = None
    """With unit tokens: the tokenizer that counts text tokens (a name or a local folder), the trainer's."""
    seed: int = 0
    """Seed of every permutation and shuffle; the stream is a pure function of plan and seed."""
    repetition: str = "error"
    """error: an amount above what exists is an error; allow: repeat as few times as possible."""
    cache: str | None = None
    """Token-cache fingerprint the stream reads visual tokens from; None: no tokens."""
    total: int | None = None
    """Total samples when groups give weights; must be absent when groups give counts."""
    heldout: float = 0.0
    """Fraction of every source held out for evaluation, chosen by a hash of the sample id: the
    stream never yields a held-out sample, `heldout_items` yields only those."""
    heldout_by: str = "id"
    """id: the id hash alone; image: also every sample sharing an image with a held-out one."""
    heldout_near: bool = False
    """With heldout_by image: group near-duplicate images (difference hash) too."""
    dedup: str | None = None
    """exact | near: leave out of training every generation sample whose target image is a copy
    of an earlier training generation sample's (same sha256; near: or close difference hash)."""
    origin: str = "<spec>"
    """The YAML file the spec came from (messages only; not part of the plan hash)."""

    def __post_init__(self):
        problems = []
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed: expected an integer >= 0, got {self.seed!r}")
        if isinstance(self.heldout, bool) or not isinstance(self.heldout, int | float) or not 0 <= self.heldout < 1:
            problems.append(f"heldout: expected a fraction in [0, 1), e.g. 0.02, got {self.heldout!r}")
        if self.heldout_by not in HELDOUT_BY:
            problems.append(f"heldout.by: expected one of {', '.join(HELDOUT_BY)}, got {self.heldout_by!r}")
        if self.heldout_near and self.heldout_by != "image":
            problems.append("heldout.near: only with by: image (near duplicates are images)")
        if self.dedup not in (None, "exact", "near"):
            problems.append(f"dedup: expected exact or near (or leave it out), got {self.dedup!r}")
        if self.repetition not in REPETITION:
            problems.append(f"repetition: expected one of {', '.join(REPETITION)}, got {self.repetition!r}")
        if self.cache is not None and (not isinstance(self.cache, str) or not self.cache):
            problems.append(f"cache: expected a token-cache fingerprint string, got {self.cache!r}")
        if not self.sources:
            problems.append("sources: the spec names no source; add at least one under sources:")
        if self.unit not in UNITS:
            problems.append(f"unit: expected one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.unit == "tokens" and not self.tokenizer:
            problems.append(
                "tokenizer: unit tokens counts text tokens with a tokenizer; name the trainer's, e.g. qwen2.5"
            )
        if self.phases and (self.groups or self.total is not None):
            problems.append(
                "groups: a spec with phases gives its amounts in each phase; remove the top-level groups/total"
            )
        elif not self.phases:
            if not self.groups:
                problems.append("groups: the spec names no group; add e.g. groups: {understanding: 1M}")
            object.__setattr__(self, "phases", (PhaseSpec(name="all", groups=self.groups, total=self.total),))
        pnames = [p.name for p in self.phases]
        for dup in sorted({n for n in pnames if pnames.count(n) > 1}):
            problems.append(f"phases.{dup}: two phases have this name")
        multi = len(self.phases) > 1 or not self.groups
        for ph in self.phases:
            where = f"phases.{ph.name}." if multi else ""
            if not ph.groups:
                problems.append(f"{where}groups: the phase draws from no group; give at least one a positive amount")
            problems += _amount_problems(ph.groups, ph.total, where)
        names = [s.name for s in self.sources]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"sources.{dup}: defined twice")
        groups = {g: None for g in self.group_names}
        for s in self.sources:
            if s.group not in groups:
                problems.append(
                    f"sources.{s.name}.group: unknown group {s.group!r}; "
                    + ("give it an amount in a phase, or remove the source" if multi else "declare it under groups:")
                    + f" (known: {', '.join(groups) or 'none'})"
                )
        for ph in self.phases:
            where = f"phases.{ph.name}.groups" if multi else "groups"
            for g in ph.groups:
                members = [s.name for s in self.sources if s.group == g.name]
                if not members:
                    problems.append(
                        f"{where}.{g.name}: no source belongs to this group; add a source with "
                        f"group: {g.name} or remove the group"
                    )
                for src, _ in g.shares:
                    if src not in members:
                        problems.append(
                            f"{where}.{g.name}.split.{src}: unknown source {src!r} for this group "
                            f"(its sources: {', '.join(members) or 'none'})"
                        )
                missing = [m for m in members if g.shares and m not in dict(g.shares)]
                if missing:
                    problems.append(f"{where}.{g.name}.split: explicit split lacks a share for {', '.join(missing)}")
        if problems:
            raise ConfigError(f"invalid mixture spec {self.origin}:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML-able values (paths absolute, shorthands expanded)."""
        out: dict[str, Any] = {"seed": self.seed, "repetition": self.repetition, "cache": self.cache}
        if self.total is not None:
            out["total"] = self.total
        if self.heldout and self.heldout_by == "id":
            out["heldout"] = self.heldout
        elif self.heldout:
            out["heldout"] = {"fraction": self.heldout, "by": self.heldout_by, "near": self.heldout_near}
        if self.dedup:
            out["dedup"] = self.dedup
        if self.unit != "samples":
            out["unit"], out["tokenizer"] = self.unit, self.tokenizer
        out["sources"] = {
            s.name: {"path": str(s.path), "group": s.group, **({"kind": s.kind} if s.kind else {})}
            for s in self.sources
        }
        if self.groups:
            out["groups"] = _groups_dict(self.groups)
        else:
            out["phases"] = [
                {
                    "name": p.name,
                    **({"total": p.total} if p.total is not None else {}),
                    "groups": {**_groups_dict(p.groups), **dict.fromkeys(p.absent, 0)},
                }
                for p in self.phases
            ]
        return out

    @property
    def group_names(self) -> tuple[str, ...]:
        """Every group, in the order it first appears over the phases."""
        return tuple(dict.fromkeys(g for p in self.phases for g in (*(x.name for x in p.groups), *p.absent)))


def _groups_dict(groups: tuple[GroupSpec, ...]) -> dict[str, Any]:
    out = {}
    for g in groups:
        entry: dict[str, Any] = {"count": g.count} if g.count is not None else {"weight": g.weight}
        entry["split"] = dict(g.shares) if g.shares else g.split
        out[g.name] = entry
    return out
