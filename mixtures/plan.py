"""The planner: spec + manifests -> exact per-source counts, feasibility, estimates, a hash.

Reads manifests, the datasets' `catalog/` arrays when a `kind:` filter or a held-out split
needs them, and a few sample records for the token estimates. Every infeasibility is
collected and raised at once, each saying what to change. The plan hash covers what decides
the sample sequence (seed, cache, each source's group, filter, data checksums and count),
not where the data lives, so a run moved to another machine resumes with the same hash.

A plan is computed once per run: `save_plan` writes it to a folder (plan.json and one .npy
of eligible samples per filtered source), and every rank and loader worker opens it with
`load_plan`, memory-mapped, reading no manifest, catalog or shard index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np

from vpit import storage
from vpit.common import text_table
from vpit.errors import ConfigError
from vpit.mixtures.catalog import Catalog, RecordReader, build_catalog, heldout_threshold
from vpit.mixtures.quota import apportion
from vpit.mixtures.spec import MixtureSpec
from vpit.pipelines.shards import load_manifest

__all__ = [
    "PLAN_VERSION", "PhasePlan", "Plan", "SourcePlan", "load_plan", "make_plan", "save_plan", "spec_key",
    "text_chars",
]  # fmt: skip

PLAN_VERSION = 1  # bump when the sampler's mapping from (plan, index) to sample changes
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English BPE tokenizers; estimates only
ESTIMATE_SAMPLES = 32  # records read per source for the token estimates
DEFAULT_M = 64  # visual tokens per image when no cache is named (the reference recipe)
TOKEN_SAMPLES = 2048  # records per source and phase tokenized for unit: tokens (that phase's draws)


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """One phase's exact counts; the phases run in order, each a contiguous stretch of samples."""

    name: str
    groups: tuple[tuple[str, int], ...]
    """(group, samples in this phase) for every group of the plan, in plan order (0: none)."""
    counts: tuple[tuple[str, int], ...]
    """(source, samples in this phase) for every source, in plan order."""
    tokens: tuple[tuple[str, int], ...] = ()
    """With unit tokens: (group, token amount asked for) in plan order."""
    token_means: tuple[tuple[str, float], ...] = ()
    """With unit tokens: (source, mean tokens per sample over its draws in this phase)."""

    @property
    def total(self) -> int:
        return sum(c for _, c in self.groups)


@dataclasses.dataclass(frozen=True, eq=False)
class SourcePlan:
    """One source's part of the plan."""

    name: str
    group: str
    kind: str | None
    catalog: Catalog
    """Its eligible samples and how to find them."""
    count: int
    """Samples it contributes over the run."""
    text_tokens: int
    """Estimated text tokens over the run."""
    images: int
    """Estimated images over the run."""
    tokens_per_sample: float | None = None
    """With unit tokens: mean text + visual tokens per sample, measured with the spec's tokenizer."""

    @property
    def available(self) -> int:
        return self.catalog.size

    @property
    def repeat(self) -> float:
        return self.count / self.available


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Exact counts for a spec; everything the sampler needs, and a hash that names it."""

    spec: MixtureSpec
    sources: tuple[SourcePlan, ...]
    groups: tuple[tuple[str, int], ...]
    """(group, planned count) in spec order."""
    m: int
    """Visual tokens per image (from the cache, else the reference 64)."""
    dim: int | None
    """Visual token width (from the cache), None without one."""
    hash: str
    heldout: tuple[dict, ...] = ()
    """With a held-out split by image: per dataset, what grouping moved and what the id hash
    alone would have leaked (`heldout.ImageSplit.report`)."""
    downloads: tuple[tuple[str, dict], ...] = ()
    """(source, download_arrivals) for sources built from URL downloads: requested vs arrived."""
    duplicates: tuple[tuple[str, int], ...] = ()
    """(dataset, generation samples left out as repeats) with the spec's `dedup`."""
    phases: tuple[PhasePlan, ...] = ()
    """The phases in order; () for a plan made by hand: one phase of `groups` and the counts."""

    def phase_plans(self) -> tuple[PhasePlan, ...]:
        if self.phases:
            return self.phases
        return (PhasePlan("all", self.groups, tuple((s.name, s.count) for s in self.sources)),)

    def phase_steps(self, batch_size: int) -> list[tuple[str, int, int]]:
        """(phase, first step, last step) for global batches of `batch_size`, steps counted from 1;
        a step that straddles a boundary is in both phases."""
        out, start = [], 0
        for phase in self.phase_plans():
            end = start + phase.total
            out.append((phase.name, start // batch_size + 1, -(-end // batch_size)))
            start = end
        return out

    @property
    def total(self) -> int:
        return sum(c for _, c in self.groups)

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def counts(self) -> dict[str, int]:
        return {s.name: s.count for s in self.sources}

    def table(self, batch_size: int | None = None) -> str:
        """The plan as a human reads it (what `vpit mix plan` prints); with a global batch size,
        each phase's steps."""
        cache = f"{self.spec.cache} (m={self.m}, d={self.dim})" if self.spec.cache else f"none (m={self.m} assumed)"
        lines = [
            f"mixture {self.spec.origin}",
            f"  plan hash {self.hash}   seed {self.seed}   repetition {self.spec.repetition}   token cache {cache}",
            "",
        ]
        head = ("source", "group", "kind", "available", "planned", "repeat", "text tok*", "visual tok*")
        rows = [
            (
                s.name,
                s.group,
                s.kind or "any",
                f"{s.available:,}",
                f"{s.count:,}",
                f"{s.repeat:.2f}x",
                _human(s.text_tokens),
                _human(s.images * self.m),
            )
            for s in self.sources
        ]
        lines += text_table(head, rows, 3)
        lines.append("")
        head = ("group", "planned", "share", "text tok*", "visual tok*", "visual share")
        rows = []
        for g, count in self.groups:
            members = [s for s in self.sources if s.group == g]
            text = sum(s.text_tokens for s in members)
            vis = sum(s.images for s in members) * self.m
            rows.append(
                (
                    g,
                    f"{count:,}",
                    f"{count / self.total:.1%}",
                    _human(text),
                    _human(vis),
                    f"{vis / max(1, text + vis):.1%}",
                )
            )
        text = sum(s.text_tokens for s in self.sources)
        vis = sum(s.images for s in self.sources) * self.m
        rows.append(
            ("total", f"{self.total:,}", "100.0%", _human(text), _human(vis), f"{vis / max(1, text + vis):.1%}")
        )
        lines += text_table(head, rows, 1)
        if len(self.phase_plans()) > 1 or self.spec.unit == "tokens":
            lines += ["", *self._phase_table(batch_size)]
        repeated = [s for s in self.sources if s.count > s.available]
        if repeated:
            lines.append("")
            lines += [
                f"  repeats {s.name}: each sample {s.count // s.available} or {-(-s.count // s.available)} "
                f"times ({s.repeat:.2f}x, repetition: allow)"
                for s in repeated
            ]
        if self.downloads:
            lines += ["", "downloads (requested URLs against what arrived):"]
            for name, a in self.downloads:
                why = ", ".join(f"{k} {v:,}" for k, v in a["reasons"].items())
                lines.append(
                    f"  {name}: {a['arrived']:,} of {a['requested']:,} arrived "
                    f"({a['arrived'] / max(1, a['requested']):.1%})" + (f"; lost to {why}" if why else "")
                )
        if self.spec.dedup:
            lines += ["", f"dedup: {self.spec.dedup} (generation samples whose target image repeats an earlier one):"]
            lines += [f"  {root}: {n:,} left out" for root, n in self.duplicates]
        if self.heldout:
            from vpit.mixtures.heldout import ImageSplit

            lines += ["", *ImageSplit(masks={}, report=self.heldout).table(self.spec.heldout_by)]
        lines.append(
            f"\n  * estimated: text from {ESTIMATE_SAMPLES} records per source at {CHARS_PER_TOKEN} "
            f"chars/token; visual = images x {self.m}"
        )
        return "\n".join(lines)

    def _phase_table(self, batch_size: int | None) -> list[str]:
        """Per phase: samples and share per group, steps; in token units the tokens asked for and
        the share they come to at the measured tokens per sample."""
        names = [g for g, _ in self.groups]
        steps = dict((n, (a, b)) for n, a, b in self.phase_steps(batch_size)) if batch_size else {}
        head = ("phase", "samples", *(("steps",) if steps else ()), *names)
        rows = []
        for p in self.phase_plans():
            cells = [f"{n:,} ({n / p.total:.1%})" if n else "-" for _, n in p.groups]
            rows.append(
                (p.name, f"{p.total:,}", *((f"{steps[p.name][0]:,}-{steps[p.name][1]:,}",) if steps else ()), *cells)
            )
        title = "phases" + (
            f" (steps of a global batch of {batch_size:,})" if batch_size else " (give --batch-size for steps)"
        )
        lines = [title + ":", *text_table(head, rows, 0)]
        if self.spec.unit == "tokens":
            lines += ["", "token shares per phase, asked for (unit: tokens) -> what the counts draw (measured):"]
            for p in self.phase_plans():
                asked, per = dict(p.tokens), dict(p.token_means)
                got = {g: 0.0 for g in names}
                for src, n in p.counts:
                    got[next(s.group for s in self.sources if s.name == src)] += n * per[src]
                ta, tg = sum(asked.values()), sum(got.values())
                cells = ", ".join(f"{g} {asked[g] / ta:.1%} -> {got[g] / tg:.1%}" for g in names if asked[g] or got[g])
                lines.append(f"  {p.name}: {_human(ta)} tokens asked, {_human(tg)} planned; {cells}")
            lines.append(
                "  tokens/sample: "
                + ", ".join(f"{s.name} {s.tokens_per_sample:.1f}" for s in self.sources)
                + f" (over the run; each phase's draws, up to {TOKEN_SAMPLES:,} per source, tokenizer "
                f"{self.spec.tokenizer})"
            )
        return lines


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def text_chars(record: dict) -> int:
    """Characters of text in a sample's messages."""
    return sum(len(part.get("text", "")) for msg in record.get("messages", []) for part in msg["content"])


def _split(
    spec: MixtureSpec, group, amount: int, catalogs: dict[str, Catalog], carry: dict[str, Fraction] | None = None
) -> dict[str, int]:
    """A group's amount among its sources (by size, equally, or by explicit shares). Over phases,
    `carry` holds each source's ideal minus its samples in the earlier phases: a source rounded up
    in one phase is owed less in the next (rounding each phase alone gave the same source the extra
    sample every time: two sources of 3 and phases of 3 + 3 drew 4 of one and 2 of the other)."""
    members, weights = _split_weights(spec, group, catalogs)
    carry = {} if carry is None else carry
    total = sum(Fraction(w) for w in weights)
    ideal = {m: amount * Fraction(w) / total + carry.get(m, 0) for m, w in zip(members, weights, strict=True)}
    owed = [max(Fraction(0), ideal[m]) for m in members]
    counts = apportion(amount, owed if sum(owed) > 0 else weights)
    for m, c in zip(members, counts, strict=True):
        carry[m] = ideal[m] - c
    return dict(zip(members, counts, strict=True))


def _split_weights(spec: MixtureSpec, group, catalogs: dict[str, Catalog]) -> tuple[list[str], list]:
    """A group's sources and their relative weights: their sizes, equal, or the explicit shares."""
    members = [s.name for s in spec.sources if s.group == group.name]
    if group.split == "equal":
        return members, [1] * len(members)
    if group.split == "explicit":
        shares = dict(group.shares)
        return members, [shares[m] for m in members]
    return members, [catalogs[m].size for m in members]


def _most_feasible(group, members: list[str], catalogs: dict[str, Catalog], shares: dict[str, float]) -> int:
    """The largest amount the group can take without repeating any of its sources (close bound)."""
    sizes = {m: catalogs[m].size for m in members}
    if group.split == "proportional":
        return sum(sizes.values())
    w = {m: (1.0 if group.split == "equal" else shares[m]) for m in members}
    return int(min(sizes[m] * sum(w.values()) / w[m] for m in members))


def _check_cache(spec: MixtureSpec, problems: list[str]) -> tuple[int, int | None]:
    if spec.cache is None:
        return DEFAULT_M, None
    try:
        from vpit.pipelines.token_cache import CacheError, TokenCache
    except ImportError:
        problems.append("cache: this vpit has no token-cache support (pipelines.token_cache); remove cache:")
        return DEFAULT_M, None
    m = dim = None
    for s in spec.sources:
        try:
            cache = TokenCache(s.path, spec.cache)
        except CacheError as e:
            problems.append(f"cache: source {s.name} ({s.path}) has no usable token cache {spec.cache!r}: {e}")
            continue
        if m is not None and (cache.m, cache.dim) != (m, dim):
            problems.append(
                f"cache: source {s.name} has tokens of shape ({cache.m}, {cache.dim}) but others "
                f"({m}, {dim}); precompute every source with the same encoder"
            )
        m, dim = cache.m, cache.dim
    return (m or DEFAULT_M), dim


def _estimate(name: str, catalog: Catalog, count: int, seed: int) -> tuple[int, int]:
    """(text tokens, images) over `count` draws, from a seeded sample of the source's records."""
    from vpit.mixtures.sampler import source_items  # the same permutation the stream draws from

    n = min(ESTIMATE_SAMPLES, catalog.size)
    shards, positions = catalog.locate(source_items(seed, name, catalog.size, np.arange(n)))
    reader = RecordReader(catalog.root, catalog.shard_names, versions=catalog.shard_versions)
    records = []
    try:
        for s, p in zip(shards, positions, strict=True):
            try:
                records.append(reader.record(int(s), int(p)))
            except ValueError:  # a damaged record: the trainer skips it too (its error budget)
                continue
    finally:
        reader.close()
    n = max(1, len(records))
    chars = sum(text_chars(r) for r in records) / n
    images = sum(len(r.get("images", [])) for r in records) / n
    return round(count * chars / CHARS_PER_TOKEN), round(count * images)


def make_plan(spec: MixtureSpec) -> Plan:
    """Resolve the spec against its datasets. Raises ValueError listing every problem and its fix."""
    problems: list[str] = []
    catalogs: dict[str, Catalog] = {}
    grouping, masks = None, {}
    # A source folder without a complete manifest is reported by build_catalog below, with its fix;
    # with every folder a dataset, a failure of the image split or of dedup is an error of its own.
    readable = all((m := load_manifest(s.path)) and m.get("complete", True) for s in spec.sources)
    if spec.heldout > 0 and readable:
        from vpit.mixtures.heldout import split_masks

        grouping, masks = split_masks(spec)
    drops, dropped = {}, {}
    if spec.dedup and readable:
        from vpit.mixtures.heldout import duplicate_masks

        held_for_dedup = masks if masks else {}
        if spec.heldout > 0 and not masks:  # by id: the id hash decides what trains
            from vpit.mixtures.heldout import mixture_images

            images = mixture_images(spec)
            start = 0
            for root, n in zip(images.roots, images.sizes, strict=True):
                held_for_dedup[root] = images.id_hash[start : start + n] < np.uint64(heldout_threshold(spec.heldout))
                start += n
        drops, dropped = duplicate_masks(spec, held_for_dedup)
    for s in spec.sources:
        root = storage.as_root(s.path)
        try:
            catalogs[s.name] = build_catalog(
                s.path,
                s.kind,
                f"sources.{s.name}.path",
                heldout=spec.heldout,
                held=masks.get(root),
                held_key=grouping.digest(root) if grouping and root in masks else None,
                drop=drops.get(root),
            )
        except ValueError as e:
            problems.append(str(e))
            continue
        if catalogs[s.name].size == 0:
            have = ", ".join(f"{k} {v}" for k, v in catalogs[s.name].kinds.items()) or "no samples"
            problems.append(
                f"sources.{s.name}.kind: {s.path} has no samples of kind {s.kind!r} (it has: {have}); "
                "change kind or the path"
            )
    m, dim = _check_cache(spec, problems)
    if problems:
        raise ConfigError(f"cannot plan {spec.origin}:\n  - " + "\n  - ".join(problems))

    counter = _TokenCounter(spec, catalogs, m) if spec.unit == "tokens" else None
    group_names = spec.group_names
    multi = len(spec.phases) > 1 or not spec.groups
    phases, counts, carry = [], {s.name: 0 for s in spec.sources}, {}
    for ph in spec.phases:
        where = f"phases.{ph.name}." if multi else ""
        if ph.total is not None:
            amounts = apportion(ph.total, [g.weight for g in ph.groups])
            for g, a in zip(ph.groups, amounts, strict=True):
                if a == 0:
                    problems.append(
                        f"{where}groups.{g.name}.weight: {g.weight} of total {ph.total:,} rounds to 0; "
                        "raise the weight or the total"
                    )
        else:
            amounts = [g.count for g in ph.groups]
        tokens = dict(zip((g.name for g in ph.groups), amounts, strict=True)) if counter else {}
        means: dict[str, float] = {}
        if counter:  # token amounts -> sample counts
            amounts, split, means = _token_counts(spec, ph, amounts, catalogs, counter, counts, carry)
        else:
            split = {}
            for g, amount in zip(ph.groups, amounts, strict=True):
                split.update(_split(spec, g, amount, catalogs, carry))
        for name in counts:
            counts[name] += split.get(name, 0)
        by_group = dict(zip((g.name for g in ph.groups), amounts, strict=True))
        phases.append(
            PhasePlan(
                name=ph.name,
                groups=tuple((g, by_group.get(g, 0)) for g in group_names),
                counts=tuple((s.name, split.get(s.name, 0)) for s in spec.sources),
                tokens=tuple((g, tokens.get(g, 0)) for g in group_names) if tokens else (),
                token_means=tuple((s.name, means.get(s.name, 0.0)) for s in spec.sources) if means else (),
            )
        )
    over = [n for n, c in counts.items() if c > catalogs[n].size]
    if over and spec.repetition == "error":
        if not multi and spec.unit == "samples":  # one amount per group: say how far to lower it
            for g in spec.groups:
                members = [s.name for s in spec.sources if s.group == g.name]
                if not any(n in over for n in members):
                    continue
                most = _most_feasible(g, members, catalogs, dict(g.shares))
                field = f"groups.{g.name}.count" if spec.total is None else f"total (or groups.{g.name}.weight)"
                detail = ", ".join(
                    f"{n} needs {counts[n]:,} of {catalogs[n].size:,}{_shortfall(catalogs[n])}"
                    for n in members
                    if n in over
                )
                problems.append(
                    f"{field}: group {g.name} asks for {dict(phases[0].groups)[g.name]:,} samples but {detail}; "
                    f"lower it to at most {most:,}, add sources to group {g.name}, or set repetition: allow"
                )
        else:
            for name in over:
                group = next(s.group for s in spec.sources if s.name == name)
                per = ", ".join(f"{c:,} in {p.name}" for p in phases if (c := dict(p.counts)[name]))
                problems.append(
                    f"phases: source {name} (group {group}) is drawn {counts[name]:,} times ({per}) but has "
                    f"{catalogs[name].size:,} samples{_shortfall(catalogs[name])}; lower group {group}'s "
                    "amounts in these phases, add sources to it, or set repetition: allow"
                )
    if problems:
        raise ConfigError(f"infeasible mixture {spec.origin}:\n  - " + "\n  - ".join(problems))

    sources = []
    for s in spec.sources:
        text, images = _estimate(s.name, catalogs[s.name], counts[s.name], spec.seed)
        sources.append(
            SourcePlan(
                name=s.name,
                group=s.group,
                kind=s.kind,
                catalog=catalogs[s.name],
                count=counts[s.name],
                text_tokens=text,
                images=images,
                tokens_per_sample=_overall_mean(s.name, phases) if counter else None,
            )
        )
    groups = tuple((g, sum(dict(p.groups)[g] for p in phases)) for g in group_names)
    from vpit.mixtures.sampler import SAMPLER_VERSION

    key = {
        "plan": PLAN_VERSION,
        "sampler": SAMPLER_VERSION,
        "seed": spec.seed,
        "cache": spec.cache,
        "groups": groups,
        "sources": [(s.name, s.group, s.kind, s.catalog.fingerprint, s.count) for s in sources],
    }
    if multi or spec.unit != "samples":  # (a plan of one phase in samples keeps the hash it always had)
        key["phases"] = [dataclasses.astuple(p) for p in phases]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    heldout = grouping.for_sources(spec) if grouping else ()
    downloads = tuple((s.name, a) for s in sources if (a := download_arrivals(s.catalog.root)))
    duplicates = tuple((root, n) for root, n in dropped.items())
    return Plan(
        spec=spec,
        sources=tuple(sources),
        groups=groups,
        m=m,
        dim=dim,
        hash=digest,
        heldout=heldout,
        downloads=downloads,
        duplicates=duplicates,
        phases=tuple(phases),
    )


class _TokenCounter:
    """Tokens of a source's draws (`sample_tokens`, with the spec's tokenizer), counted once each."""

    def __init__(self, spec: MixtureSpec, catalogs: dict[str, Catalog], m: int):
        from vpit.model.tokenizer import load_tokenizer

        self.spec, self.catalogs, self.m = spec, catalogs, m
        self.tokenizer = load_tokenizer(spec.tokenizer)
        self.counted: dict[tuple[str, int], int | None] = {}

    def mean(self, source: str, first: int, count: int) -> float:
        """Mean tokens per sample of draws [first, first + count): all of them up to TOKEN_SAMPLES,
        else TOKEN_SAMPLES spread evenly over the range. 0 when none is readable."""
        from vpit.mixtures.sampler import source_items

        catalog = self.catalogs[source]
        n = max(1, count)
        draws = first + (np.arange(min(n, TOKEN_SAMPLES)) * n) // min(n, TOKEN_SAMPLES)
        items = source_items(self.spec.seed, source, catalog.size, draws).tolist()
        todo = [i for i in dict.fromkeys(items) if (source, i) not in self.counted]
        if todo:
            shards, positions = catalog.locate(np.asarray(todo))
            reader = RecordReader(catalog.root, catalog.shard_names, versions=catalog.shard_versions)
            try:
                for i, sh, p in zip(todo, shards.tolist(), positions.tolist(), strict=True):
                    try:
                        self.counted[source, i] = sample_tokens(reader.record(sh, p), self.tokenizer, self.m)
                    except ValueError:  # a damaged record: the trainer skips it too
                        self.counted[source, i] = None
            finally:
                reader.close()
        seen = [self.counted[source, i] for i in items if self.counted[source, i] is not None]
        return sum(seen) / len(seen) if seen else 0.0


def _token_counts(
    spec: MixtureSpec, phase, amounts: list[int], catalogs: dict, counter: _TokenCounter, start: dict, carry: dict
) -> tuple[list[int], dict[str, int], dict[str, float]]:
    """Token amounts -> sample counts for one phase: (group counts, source counts, each source's
    mean tokens per sample over its draws in this phase). The means are measured on the very draws
    the counts give (each source continues its permutation where the earlier phases left it), so a
    few rounds settle it: counts from means, means from counts."""
    members = {g.name: [s.name for s in spec.sources if s.group == g.name] for g in phase.groups}
    means = {n: counter.mean(n, start[n], TOKEN_SAMPLES) for ns in members.values() for n in ns}
    for _ in range(4):
        group_counts = []
        for g, a in zip(phase.groups, amounts, strict=True):
            mean = _group_mean(spec, g, catalogs, means)
            if mean <= 0:
                raise ConfigError(
                    f"unit: tokens: group {g.name}'s sources have no readable records to count tokens in; "
                    "check them with `vpit verify`"
                )
            group_counts.append(max(1, round(a / mean)))
        trial, split = dict(carry), {}
        for g, c in zip(phase.groups, group_counts, strict=True):
            split.update(_split(spec, g, c, catalogs, trial))
        measured = {n: counter.mean(n, start[n], split[n]) if split[n] else means[n] for n in means}
        if measured == means:
            break
        means = measured
    carry.clear()
    carry.update(trial)
    return group_counts, split, means


def sample_tokens(record: dict, tokenizer, m: int) -> int:
    """Tokens a sample counts for in `unit: tokens`: its text parts' tokens + m per image (the
    chat template's few tokens per turn are not counted)."""
    texts = [part["text"] for msg in record.get("messages", []) for part in msg["content"] if part.get("text")]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return sum(len(x) for x in ids) + m * len(record.get("images", []))


def _overall_mean(source: str, phases: list[PhasePlan]) -> float:
    """A source's mean tokens per sample over the run (its phases' means, weighted by its draws)."""
    pairs = [(dict(p.counts)[source], dict(p.token_means)[source]) for p in phases]
    n = sum(c for c, _ in pairs)
    return sum(c * mu for c, mu in pairs) / n if n else max((mu for _, mu in pairs), default=0.0)


def _group_mean(spec: MixtureSpec, group, catalogs: dict[str, Catalog], per_sample: dict[str, float]) -> float:
    """Mean tokens per sample of a group's draws, its sources weighted as its split weights them."""
    members, w = _split_weights(spec, group, catalogs)
    return sum(wi * per_sample[n] for wi, n in zip(w, members, strict=True)) / sum(w)


def download_arrivals(root: Path) -> dict | None:
    """For a dataset built from a URL download (vpit ingest pairs): URLs requested, samples that
    arrived, and why the rest did not (quarantine reasons). None for other datasets."""
    from collections import Counter

    manifest = load_manifest(root)
    if not manifest or manifest.get("config", {}).get("adapter") != "pairs":
        return None
    reasons: Counter = Counter()
    for entry in manifest["shards"]:
        reasons.update(entry.get("quarantined", {}))

    def urls(entry: dict) -> int:  # "records": the [first, end) input rows the shard was made from
        r = entry.get("records", entry["samples"])
        return int(r[1]) - int(r[0]) if isinstance(r, list) else int(r)

    requested = sum(urls(e) for e in manifest["shards"])
    arrived = sum(int(e["samples"]) for e in manifest["shards"])
    return {"requested": requested, "arrived": arrived, "reasons": dict(reasons.most_common(3))}


def _shortfall(catalog: Catalog) -> str:
    a = download_arrivals(catalog.root)
    if a is None:
        return ""
    why = ", ".join(f"{k} {v:,}" for k, v in a["reasons"].items())
    return (
        f" (downloaded: {a['arrived']:,} of {a['requested']:,} URLs arrived, "
        f"{a['arrived'] / max(1, a['requested']):.1%}{'; lost to ' + why if why else ''})"
    )


def spec_key(spec: MixtureSpec) -> str:
    """A hash of everything the spec says (a saved plan belongs to exactly one spec)."""
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "origin"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_plan(plan: Plan, folder: str | Path) -> Path:
    """Write `plan` to `folder` (replaced whole: written beside it, then renamed into place)."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sources = []
    for i, s in enumerate(plan.sources):
        c = s.catalog
        np.save(tmp / f"source-{i}.starts.npy", np.asarray(c.shard_starts, dtype=np.int64), allow_pickle=False)
        if c.picks is not None:
            np.save(tmp / f"source-{i}.picks.npy", np.asarray(c.picks, dtype=np.int64), allow_pickle=False)
        sources.append(
            {
                **{k: getattr(s, k) for k in ("name", "group", "kind", "count", "text_tokens", "images")},
                "tokens_per_sample": s.tokens_per_sample,
                "root": str(c.root),
                "shard_names": list(c.shard_names),
                "shard_versions": list(c.shard_versions),
                "fingerprint": c.fingerprint,
                "kinds": c.kinds,
                "picks": c.picks is not None,
            }
        )
    meta = {
        "plan_version": PLAN_VERSION,
        "hash": plan.hash,
        "spec": spec_key(plan.spec),
        "groups": [list(g) for g in plan.groups],
        "m": plan.m,
        "dim": plan.dim,
        "sources": sources,
        "heldout": list(plan.heldout),
        "downloads": [list(d) for d in plan.downloads],
        "duplicates": [list(d) for d in plan.duplicates],
        "phases": [dataclasses.asdict(p) for p in plan.phases],
    }
    (tmp / "plan.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_plan(folder: str | Path, spec: MixtureSpec) -> Plan:
    """The plan `save_plan` wrote for `spec`, its arrays memory-mapped. Refuses another spec's plan."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder} holds no plan.json; write one with make_plan + save_plan") from None
    if meta.get("plan_version") != PLAN_VERSION or meta.get("spec") != spec_key(spec):
        raise ConfigError(f"{folder}: the saved plan was made for another spec or vpit version; plan again")
    sources = []
    for i, s in enumerate(meta["sources"]):
        picks = np.load(folder / f"source-{i}.picks.npy", mmap_mode="r", allow_pickle=False) if s["picks"] else None
        catalog = Catalog(
            root=storage.as_root(s["root"]),
            shard_names=tuple(s["shard_names"]),
            shard_versions=tuple(s.get("shard_versions", ())),
            shard_starts=np.load(folder / f"source-{i}.starts.npy", allow_pickle=False),
            picks=picks,
            fingerprint=s["fingerprint"],
            kinds=s["kinds"],
        )
        sources.append(
            SourcePlan(
                **{k: s[k] for k in ("name", "group", "kind", "count", "text_tokens", "images")},
                catalog=catalog,
                tokens_per_sample=s.get("tokens_per_sample"),
            )
        )
    groups = tuple((g, int(c)) for g, c in meta["groups"])
    heldout = tuple(meta.get("heldout", ()))
    return Plan(
        spec=spec,
        sources=tuple(sources),
        groups=groups,
        m=meta["m"],
        dim=meta["dim"],
        hash=meta["hash"],
        heldout=heldout,
        downloads=tuple((n, a) for n, a in meta.get("downloads", ())),
        duplicates=tuple((r, int(n)) for r, n in meta.get("duplicates", ())),
        phases=tuple(
            PhasePlan(
                p["name"],
                *(tuple((k, int(v)) for k, v in p[f]) for f in ("groups", "counts", "tokens")),
                token_means=tuple((k, float(v)) for k, v in p.get("token_means", ())),
            )
            for p in meta.get("phases", ())
        ),
    )
