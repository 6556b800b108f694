"""Small real datasets for mixture tests: shards written by the shard store, with a manifest.

Written with `pipelines.shards.write_shard` directly (not a Ray ingest) so a test can ask
for exact kinds per shard, e.g. a shard that mixes understanding and generation samples.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from vpit.common import save_json_atomic
from vpit.pipelines.sample import Sample, image_entry
from vpit.pipelines.shard_index import build_catalog_arrays
from vpit.pipelines.shards import FORMAT_VERSION, write_shard
from vpit.shapes import caption, encode_image, random_scene, render


def _sample(source: str, i: int, kind: str, rng: np.random.Generator, image: bytes | None = None) -> Sample:
    scene = random_scene(rng)
    text = caption(scene)
    images: list[bytes] = []
    if kind == "text":
        messages = [
            {"role": "user", "content": [{"text": f"Describe: {text}"}]},
            {"role": "assistant", "content": [{"text": text}]},
        ]
    else:
        images = [image if image is not None else encode_image(render(scene, 16))]
        if kind == "generation":
            messages = [
                {"role": "user", "content": [{"text": f"Generate an image of {text}"}]},
                {"role": "assistant", "content": [{"text": "Here is an image:"}, {"image": 0}]},
            ]
        else:
            messages = [
                {"role": "user", "content": [{"image": 0}, {"text": "What is in the picture?"}]},
                {"role": "assistant", "content": [{"text": text}]},
            ]
    record = {
        "id": f"{source}:{i:06d}",
        "source": source,
        "kind": kind,
        "messages": messages,
        "images": [image_entry(j, d, "test", 10**6) for j, d in enumerate(images)],
        "origin": {"uri": "generated", "line": i},
    }
    return Sample(record=record, images=images)


def make_dataset(
    root: Path, source: str, shards: list[list[str]], seed: int = 0, images: dict[int, bytes] | None = None
) -> Path:
    """A dataset at `root` whose shard i holds samples of the kinds `shards[i]`, in that order.
    `images`: sample number -> the image bytes it uses (default: a scene of its own)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    entries, n = [], 0
    for s, kinds in enumerate(shards):
        samples = []
        for kind in kinds:
            samples.append((f"{n:09d}", _sample(source, n, kind, rng, (images or {}).get(n))))
            n += 1
        idx = write_shard(root, s, samples)
        entries.append(
            {
                "name": idx["shard"],
                "shard": s,
                "samples": len(idx["samples"]),
                "kinds": idx["kinds"],
                "tar_bytes": idx["tar_bytes"],
                "tar_sha256": idx["tar_sha256"],
                "quarantined": {},
                "records": len(kinds),
            }
        )
    kinds = Counter(k for ks in shards for k in ks)
    save_json_atomic(
        root / "manifest.json",
        {
            "format": "vpit-shards",
            "format_version": FORMAT_VERSION,
            "config": {"test": source},
            "config_hash": source,
            "shards_planned": len(shards),
            "complete": True,
            "samples": n,
            "kinds": dict(sorted(kinds.items())),
            "quarantined": {},
            "shards": entries,
        },
    )
    build_catalog_arrays(root, entries)  # as the end of an ingest does
    return root


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def fake_plan(groups: dict[str, list[tuple[str, int, int]]], seed: int = 0, shard_size: int = 7):
    """A Plan over imaginary sources: {group: [(source, size, count), ...]}. The sampler's pure
    functions need only sizes and counts, so property tests can use large sizes for free."""
    from vpit.mixtures.catalog import Catalog
    from vpit.mixtures.plan import Plan, SourcePlan
    from vpit.mixtures.spec import GroupSpec, MixtureSpec, SourceSpec

    specs, plans = [], []
    for g, members in groups.items():
        for name, size, count in members:
            specs.append(SourceSpec(name=name, path=Path("/nonexistent") / name, group=g))
            n_shards = -(-size // shard_size)
            counts = [shard_size] * (size // shard_size) + ([size % shard_size] if size % shard_size else [])
            cat = Catalog(
                root=Path("/nonexistent") / name,
                shard_names=tuple(f"s{i}" for i in range(n_shards)),
                shard_starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                picks=None,
                fingerprint=name,
                kinds={},
            )
            plans.append(SourcePlan(name=name, group=g, kind=None, catalog=cat, count=count, text_tokens=0, images=0))
    gspecs = tuple(GroupSpec(name=g, count=sum(c for _, _, c in m)) for g, m in groups.items())
    spec = MixtureSpec(sources=tuple(specs), groups=gspecs, seed=seed, repetition="allow")
    return Plan(
        spec=spec,
        sources=tuple(plans),
        groups=tuple((g.name, g.count) for g in gspecs),
        m=64,
        dim=None,
        hash=f"fake-{seed}",
    )


def fake_phased_plan(sources: dict[str, list[tuple[str, int]]], phases: list[dict[str, int]], seed: int = 0):
    """A Plan over imaginary sources {group: [(source, size), ...]} in phases, each {source: count}
    (a source left out draws nothing in that phase)."""
    from vpit.mixtures.plan import PhasePlan

    groups = {
        g: [(n, size, sum(ph.get(n, 0) for ph in phases)) for n, size in members] for g, members in sources.items()
    }
    groups = {g: m for g, m in groups.items() if sum(c for _, _, c in m)}  # a group no phase draws is no group
    sources = {g: m for g, m in sources.items() if g in groups}
    base = fake_plan(groups, seed=seed)
    group_of = {n: g for g, members in sources.items() for n, _ in members}
    plans = tuple(
        PhasePlan(
            f"p{i}",
            tuple((g, sum(c for n, c in ph.items() if group_of[n] == g)) for g in sources),
            tuple((s.name, ph.get(s.name, 0)) for s in base.sources),
        )
        for i, ph in enumerate(phases)
    )
    return dataclasses.replace(base, phases=plans)


def upload_folder(local: Path, url: str) -> None:
    """Put a dataset folder on object storage as it is (lock files left out), one object per file."""
    from vpit import storage

    for p in sorted(Path(local).rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            storage.put_file(p, url, p.relative_to(local).as_posix())
