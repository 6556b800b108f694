"""The ingest job: raw records -> instruction shards, as a Ray Data job.

What from where: an `Adapter` knows one source kind (how to split the input into shard
tasks, how to read a task's raw records, how to turn one into a `Sample`); `run_ingest`
only schedules. Shards are decided before any worker starts (shard i = a fixed range of
input records), each shard is one task whose output depends on its input alone, and
the manifest lists shards in shard order, so the result is the same for any number of
workers. A shard is done once its index and its manifest entry exist; a re-run redoes
every shard that is not done and skips the rest.

While the job runs, a finished shard's manifest entry is one line appended to
`manifest.journal.jsonl` (a constant cost per shard, where rewriting manifest.json would grow
with every shard done); at the end the journal is compacted into manifest.json and removed.
A torn last line (a kill mid-append) is not an entry: that shard is redone.

To object storage (`--output s3://bucket/dataset`, any fsspec URL): each shard is written to a
local staging folder as above, then put object by object: tar, records, binary index,
quarantine part, and the JSON index last. Object stores cannot append, so the journal is one
small object per finished shard (`journal/shard-N.json`, put after the shard's index). A shard
is done when its journal (or manifest) entry exists, its index exists and its tar has the
entry's size, as on a local disk: completion never rests on a rename.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpit import storage
from vpit.common import cluster_cpus, init_ray, save_json_atomic, user_error_in
from vpit.config import path_field
from vpit.errors import ConfigError, VpitError
from vpit.lock import FolderLock
from vpit.pipelines.sample import Rejected, Sample
from vpit.pipelines.shard_index import (
    ALL_COLUMNS,
    CATALOG_DIR,
    build_catalog_arrays,
    catalog_is_current,
    load_catalog_arrays,
)
from vpit.pipelines.shards import FORMAT_VERSION, load_manifest, records_path, shard_name, write_shard
from vpit.records import Manifest, QuarantineLine, ShardEntry

__all__ = [
    "Adapter",
    "IngestError",
    "IngestJob",
    "IngestReport",
    "RawRecord",
    "check_adapter_config",
    "file_sha256",
    "ingest_shard",
    "run_ingest",
]


def check_adapter_config(cfg: Any) -> None:
    """The checks every adapter config shares: shard_size, max_pixels, source name."""
    if cfg.shard_size < 1:
        raise ConfigError(f"shard_size: expected an integer >= 1, got {cfg.shard_size}")
    if cfg.max_pixels < 1:
        raise ConfigError(f"max_pixels: expected an integer >= 1, got {cfg.max_pixels}")
    if not cfg.source or "." in cfg.source or ":" in cfg.source:
        raise ConfigError(f"source: expected a name without '.' or ':', got {cfg.source!r}")


def file_sha256(path: Path) -> str:
    """The sha256 of a (possibly large) input file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class IngestError(VpitError):
    """A user mistake that stops the job before it starts (bad paths, changed config...)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class IngestJob:
    """Where an ingest writes and how it runs; nothing here changes the shards."""

    output: str = path_field()
    """Dataset folder to write, or to resume."""
    workers: int | None = None
    """Ray tasks run at once; default: the CPUs of the Ray cluster (the output does not depend on it)."""
    ray_address: str | None = None
    """Ray cluster to join (ray://head:10001, auto); default: RAY_ADDRESS, else a local Ray."""
    license: str | None = None
    """Licence of the data for the dataset card (README.md), e.g. cc-by-4.0 (an SPDX-style id)."""
    citation: str | None = None
    """Citation (BibTeX) for the dataset card."""

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers: expected an integer >= 1, got {self.workers}")


@dataclasses.dataclass(frozen=True, slots=True)
class RawRecord:
    """One raw input record, before conversion. `index` numbers records in input order."""

    index: int
    origin: dict[str, Any]
    raw: Any


class Adapter:
    """One source kind. Subclasses set `source_kind`, `config` and implement three hooks."""

    source_kind: str = ""
    config: Any = None

    def plan(self) -> list[dict[str, Any]]:
        """Split the input into shard tasks (JSON-able), in input order. Runs once, on the driver.

        Each task holds `records: [first, end)`, the input record numbers it covers.
        """
        raise NotImplementedError

    def read(self, task: dict[str, Any]) -> Iterator[RawRecord]:
        """Yield the raw records of one shard task, in input order."""
        raise NotImplementedError

    def convert(self, rec: RawRecord) -> Sample | None:
        """Turn one raw record into a sample, raise `Rejected`, or return None for a non-record."""
        raise NotImplementedError

    def input_fingerprint(self) -> str:
        """A hash of the input, so a resume over changed input is refused."""
        raise NotImplementedError

    def key(self, rec: RawRecord) -> str:
        return f"{rec.index:09d}"

    def describe(self) -> dict[str, Any]:
        """The ingest config as recorded in the manifest."""
        return {"adapter": self.source_kind, **dataclasses.asdict(self.config)}

    def shard_done(self, task: dict[str, Any]) -> None:
        """Called on the driver once a shard's manifest entry is written (e.g. to free its input)."""


def ingest_shard(adapter: Adapter, root: Path, shard: int, task: dict[str, Any]) -> ShardEntry:
    """Convert and write one shard; return its manifest entry. Pure function of its inputs."""
    rejected: list[QuarantineLine] = []

    def good() -> Iterator[tuple[str, Sample]]:
        for rec in adapter.read(task):
            try:
                sample = adapter.convert(rec)
            except Rejected as e:
                rejected.append({"reason": e.reason, "detail": e.detail, "origin": rec.origin})
                continue
            if sample is not None:
                yield adapter.key(rec), sample

    name = shard_name(shard)
    qdir = root / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    # The quarantine part is written before the index: the index, written last, marks both done.
    idx = write_shard(root, shard, _finish_after(good(), lambda: _write_quarantine(qdir / f"{name}.jsonl", rejected)))
    return {
        "name": name,
        "shard": shard,
        "samples": len(idx["samples"]),
        "kinds": idx["kinds"],
        "tar_bytes": idx["tar_bytes"],
        "tar_sha256": idx["tar_sha256"],
        "quarantined": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "records": task["records"],
        "members": sorted({m for entry in idx["samples"] for m in entry["members"]}),  # for the card's schema
    }


def _finish_after(items: Iterator, on_end) -> Iterator:
    yield from items
    on_end()


def _write_quarantine(path: Path, rejected: list[QuarantineLine]) -> None:
    path.write_text(
        "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejected), encoding="utf-8"
    )


@dataclasses.dataclass
class IngestReport:
    """What a run did, for the end-of-job summary."""

    output: Path
    shards_total: int
    shards_skipped: int
    shards_written: int
    samples: int
    kinds: dict[str, int]
    quarantined: dict[str, int]
    seconds: float

    def summary(self) -> str:
        lines = [
            f"dataset   {self.output}",
            f"shards    {self.shards_total} total, {self.shards_written} written now, "
            f"{self.shards_skipped} already complete",
            f"samples   {self.samples}  (" + ", ".join(f"{k} {v}" for k, v in self.kinds.items()) + ")",
            f"quarantined {sum(self.quarantined.values())}" + ("" if not self.quarantined else ":"),
        ]
        lines += [f"  {reason:<24} {n}" for reason, n in self.quarantined.items()]
        if self.shards_written:
            lines.append(f"time      {self.seconds:.1f}s, {self.samples / max(self.seconds, 1e-9):.0f} samples/s")
        return "\n".join(lines)


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


JOURNAL = "manifest.journal.jsonl"


def _journal_entries(root: Path, remote: str | None = None) -> list[ShardEntry]:
    """The entries appended since the last compaction; a line that does not parse whole (a kill
    during the append) is skipped, so its shard counts as not done."""
    if remote is not None:
        lines = storage.read_many(remote, [f"journal/{n}" for n in storage.list_sizes(remote, "journal")]).values()
    else:
        path = root / JOURNAL
        lines = path.read_bytes().split(b"\n") if path.exists() else []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return [e for e in entries if isinstance(e, dict) and "shard" in e]


def _done_shards(root: Path, manifest: Manifest | None, remote: str | None = None) -> dict[int, ShardEntry]:
    """Shards with a manifest (or journal) entry and an index whose tar is whole (one listing)."""
    files = storage.list_sizes(remote or root, "shards")
    done = {}
    for entry in [*(manifest or {}).get("shards", []), *_journal_entries(root, remote)]:
        if f"{entry['name']}.idx.json" in files and files.get(f"{entry['name']}.tar") == entry["tar_bytes"]:
            done[entry["shard"]] = entry
    return done


def _write_manifest(
    root: Path, config: dict[str, Any], n_shards: int, done: dict[int, ShardEntry], remote: str | None = None
) -> Manifest:
    """Compact: every done shard into manifest.json (atomically: a rename, or one PUT), then the journal goes."""
    shards = [done[i] for i in sorted(done)]
    kinds: Counter = Counter()
    quarantined: Counter = Counter()
    for s in shards:
        kinds.update(s["kinds"])
        quarantined.update(s["quarantined"])
    manifest = {
        "format": "vpit-shards",
        "format_version": FORMAT_VERSION,
        "config": config,
        "config_hash": _config_hash(config),
        "shards_planned": n_shards,
        "complete": len(shards) == n_shards,
        "samples": sum(s["samples"] for s in shards),
        "kinds": dict(sorted(kinds.items())),
        "quarantined": dict(sorted(quarantined.items())),
        "shards": shards,
    }
    save_json_atomic(root / "manifest.json", manifest, indent=None)
    if remote is not None:
        storage.put_file(root / "manifest.json", remote, "manifest.json")
        storage.remove(remote, [f"journal/{n}" for n in storage.list_sizes(remote, "journal")])
    (root / JOURNAL).unlink(missing_ok=True)
    return manifest


class _Journal:
    """Appends finished shards' entries, one JSON line each, flushed as they come (to object
    storage: one object per entry, since objects cannot be appended to)."""

    def __init__(self, root: Path, remote: str | None = None):
        self.remote = remote
        self.file = None if remote else open(root / JOURNAL, "ab")  # noqa: SIM115 - open for the whole job

    def append(self, entry: ShardEntry) -> None:
        line = json.dumps(entry, sort_keys=True).encode()
        if self.remote is not None:
            storage.put_bytes(self.remote, f"journal/{entry['name']}.json", line)
            return
        self.file.write(line + b"\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _upload_shard(root: Path, remote: str, name: str) -> None:
    """Put a finished shard's files, the index that marks it whole last; then free the staging
    copies of the large ones."""
    for rel in (f"shards/{name}.tar", records_path(name), f"shards/{name}.idx.npz", f"quarantine/{name}.jsonl"):
        storage.put_file(root / rel, remote, rel)
    storage.put_file(root / "shards" / f"{name}.idx.json", remote, f"shards/{name}.idx.json")
    for rel in (f"shards/{name}.tar", records_path(name)):
        (root / rel).unlink(missing_ok=True)


def _rows_or_user_error(ds) -> Iterator[dict[str, Any]]:
    """The job's rows; a user mistake a worker found (a VpitError) is raised as itself, not as Ray's
    wrapped traceback."""
    try:
        yield from ds.iter_rows()
    except Exception as e:
        user = user_error_in(e)
        if user is None:
            raise
        raise user from None


def _rebuild_quarantine(root: Path, n_shards: int, remote: str | None = None) -> None:
    rels = [f"quarantine/{shard_name(i)}.jsonl" for i in range(n_shards)]
    parts = storage.read_many(remote or root, rels)
    tmp = root / "quarantine.jsonl.tmp"
    with open(tmp, "wb") as out:
        for rel in rels:
            out.write(parts.get(rel, b""))
    tmp.replace(root / "quarantine.jsonl")
    if remote is not None:
        storage.put_file(root / "quarantine.jsonl", remote, "quarantine.jsonl")


def _upload_catalog(root: Path, remote: str, manifest: Manifest) -> None:
    """The catalog arrays of a remote dataset, unless current: built from its indexes (through the
    node cache), put, catalog.json (what marks them whole) last."""
    if catalog_is_current(remote, manifest["shards"]):
        return
    build_catalog_arrays(root, manifest["shards"], read_from=remote)
    for name in sorted(p.name for p in (root / CATALOG_DIR).iterdir()):
        if name != "catalog.json":
            storage.put_file(root / CATALOG_DIR / name, remote, f"{CATALOG_DIR}/{name}")
    storage.put_file(root / CATALOG_DIR / "catalog.json", remote, f"{CATALOG_DIR}/catalog.json")


def run_ingest(
    adapter: Adapter,
    output: str | Path,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    card: dict[str, str | None] | None = None,
) -> IngestReport:
    """Ingest `adapter`'s input into `output`, resuming whatever a previous run left. One writer per
    output folder: a second ingest into it stops at once, naming the first (`vpit.lock`). `card`:
    licence and citation for the dataset card (README.md, written when the dataset is complete).
    An `output` URL (s3://...) is written through a local staging folder (see the module docstring);
    the lock then guards the staging folder: one writer per output per machine."""
    remote = str(storage.as_root(output)) if storage.is_remote(output) else None
    local = storage.staging_dir(remote) if remote else output
    with FolderLock(local, f"vpit ingest {adapter.source_kind}"):
        return _run_ingest(
            adapter, local, workers=workers, ray_address=ray_address, progress=progress, card=card, remote=remote
        )


def _run_ingest(
    adapter: Adapter,
    output: str | Path,
    *,
    workers: int | None,
    ray_address: str | None,
    progress: bool,
    card: dict[str, str | None] | None = None,
    remote: str | None = None,
) -> IngestReport:
    import ray
    from tqdm import tqdm

    start = time.perf_counter()
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    config = dict(adapter.describe(), input_sha256=adapter.input_fingerprint())
    manifest = load_manifest(remote or root)
    if manifest is not None and manifest["config_hash"] != _config_hash(config):
        changed = sorted(k for k in set(config) | set(manifest["config"]) if config.get(k) != manifest["config"].get(k))
        raise IngestError(
            f"{remote or root} holds a dataset ingested with another config (differs in: {', '.join(changed)}); "
            "choose a new --output, or delete the folder to start over"
        )
    tasks = adapter.plan()
    done = _done_shards(root, manifest, remote)
    todo = [i for i in range(len(tasks)) if i not in done]
    skipped = len(done)
    manifest = _write_manifest(root, config, len(tasks), done, remote)
    if todo:
        init_ray(ray_address)
        items = [{"shard": i, "task": json.dumps(tasks[i])} for i in todo]

        def work(row: dict[str, Any]) -> dict[str, Any]:
            entry = ingest_shard(adapter, root, int(row["shard"]), json.loads(row["task"]))
            if remote is not None:
                _upload_shard(root, remote, entry["name"])
            return {"entry": json.dumps(entry)}

        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(
            work, compute=ray.data.TaskPoolStrategy(size=min(len(items), workers or cluster_cpus())), num_cpus=1
        )
        bar = tqdm(total=len(todo), desc=f"ingest {adapter.source_kind}", unit="shard", disable=not progress)
        journal = _Journal(root, remote)
        try:
            for row in _rows_or_user_error(ds):
                entry = json.loads(row["entry"])
                journal.append(entry)  # the entry that marks it done
                done[entry["shard"]] = entry
                adapter.shard_done(tasks[entry["shard"]])
                bar.update(1)
        finally:
            journal.close()
            bar.close()
        manifest = _write_manifest(root, config, len(tasks), done, remote)
    _rebuild_quarantine(root, len(tasks), remote)
    if manifest["complete"]:  # the planner's per-sample columns, built once; the dataset card
        if remote is None:
            load_catalog_arrays(root, manifest["shards"], ALL_COLUMNS, write=True)  # rebuilt if a column is new
        else:
            _upload_catalog(root, remote, manifest)
        from vpit.pipelines.card import CARD, write_card

        if card is not None or not storage.exists(remote or root, CARD):
            write_card(remote or root, manifest, **(card or {}))
    return IngestReport(
        output=remote or root,
        shards_total=len(tasks),
        shards_skipped=skipped,
        shards_written=len(todo),
        samples=manifest["samples"],
        kinds=manifest["kinds"],
        quarantined=manifest["quarantined"],
        seconds=time.perf_counter() - start,
    )
