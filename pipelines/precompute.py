"""The precompute job: every image of a dataset -> its m visual tokens, once, as a Ray Data job.

One Ray item per shard. A CPU task reads the shard's binary index (image members in record
order: the driver reads no record), resets the shard's cache files, decodes and resizes its
images and yields them in fixed chunks of `batch_size` consecutive rows, as uint8 pixels (a
quarter of float32). An actor pool (one encoder per actor, `num_gpus=1` each when the cluster
has GPUs) normalises a chunk on its device, runs it as one forward and writes its rows into
the shard's .npy at rows fixed by the shard. Each image's numbers therefore depend only on
its chunk, never on the number of actors or on scheduling; actors pin torch to a fixed
thread count for the same reason. The driver only counts rows; once a shard's rows are all
in, it writes the shard's marker (last). A re-run skips shards whose marker matches the
shard's tar_sha256 and redoes the rest, so a killed job resumes with no duplicate and no loss.

The forward runs in bf16 on GPUs by default (`compute_dtype: auto`), fp32 on CPUs; the
resolved dtype is part of the fingerprint.

For a dataset on object storage (s3://...) a decode task takes the shard's index and tar whole
through its node's cache, the actors hand their rows back instead of writing them, and the
driver gathers each shard's token file in a local staging folder and puts it once complete:
tokens, then offsets, then the marker, each a whole object (a PUT is atomic, there is no rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vpit import storage
from vpit.common import init_ray, save_json_atomic
from vpit.errors import ConfigError
from vpit.lock import FolderLock
from vpit.model.encoder import EncoderConfig, decode_image, load_encoder, resize_images
from vpit.pipelines.shard_index import load_shard_arrays
from vpit.pipelines.shards import Dataset
from vpit.pipelines.token_cache import (
    STORAGE_NUMPY,
    cache_dir,
    check_cache,
    marker_path,
    offsets_path,
    stored_shape,
    to_storage,
    tokens_path,
)

__all__ = ["PrecomputeConfig", "PrecomputeReport", "plan_shard", "run_precompute"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PrecomputeConfig:
    """How the job runs; nothing here changes the tokens (the fingerprint holds what does)."""

    batch_size: int = 32
    """images per encoder forward (a chunk never crosses a shard)."""
    actors: int | None = None
    """encoder actors; default: one per GPU on a GPU cluster, else 1."""
    actor_cpus: float = 1.0
    """Ray CPUs per actor; torch runs max(1, round(actor_cpus)) threads in it."""
    decode_cpus: float = 1.0
    """Ray CPUs per decode task."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"actors: must be >= 1, got {self.actors}")
        if self.actor_cpus <= 0 or self.decode_cpus <= 0:
            raise ConfigError("actor_cpus and decode_cpus: must be > 0")


@dataclasses.dataclass
class PrecomputeReport:
    """What a run did, for the end-of-job summary."""

    dataset: Path
    fingerprint: str
    cache: Path
    shards_total: int
    shards_skipped: int
    shards_written: int
    images: int
    encode_seconds: float
    steady_images_per_s: float
    seconds: float
    cache_bytes: int
    m: int
    dim: int
    dtype: str

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.encode_seconds, 1e-9)

    def summary(self) -> str:
        lines = [
            f"dataset     {self.dataset}",
            f"fingerprint {self.fingerprint}  (m={self.m}, d={self.dim}, {self.dtype})",
            f"cache       {self.cache}",
            f"shards      {self.shards_total} total, {self.shards_written} written now, "
            f"{self.shards_skipped} already complete",
            f"images      {self.images} encoded now",
            f"cache size  {self.cache_bytes / 2**20:.1f} MiB",
        ]
        if self.images:
            lines.append(
                f"time        {self.seconds:.1f}s total, {self.encode_seconds:.1f}s encoding (actor start "
                f"included): {self.images_per_s:.1f} images/s; {self.steady_images_per_s:.1f} images/s "
                "once the first chunk is out"
            )
        return "\n".join(lines)


def plan_shard(root: str | Path, name: str, version: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A shard's row offsets (samples + 1) and the [offset, size] of every image in row order
    (sample order, then record["images"] order), from its binary index alone."""
    arrays = load_shard_arrays(root, name, version)
    return arrays.image_start, arrays.images


def _data_offset(fd: int) -> int:
    with os.fdopen(os.dup(fd), "rb") as f:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        read(f)
        return f.tell()


def _prepare(
    root: str | Path, cdir: Path, name: str, m: int, dim: int, dtype: str, version: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Make one shard's cache files ready for its rows: the marker goes first (the shard now reads
    as partial), the offsets are written, the token file is (re)created unless it already has
    the right shape (a resumed or retried task rewrites every row anyway)."""
    marker_path(cdir, name).unlink(missing_ok=True)
    offsets, spans = plan_shard(root, name, version)
    tmp = offsets_path(cdir, name).with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, offsets, allow_pickle=False)
    tmp.replace(offsets_path(cdir, name))
    shape, stored = stored_shape(len(spans), m, dim, dtype), STORAGE_NUMPY[dtype]
    path = tokens_path(cdir, name)
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r") if len(spans) else None
        ok = arr is not None and arr.shape == shape and arr.dtype == stored
    except (FileNotFoundError, ValueError):
        ok = False
    if not ok:
        if len(spans):  # sparse: the rows are filled by the actors
            np.lib.format.open_memmap(str(path), mode="w+", dtype=stored, shape=shape).flush()
        else:
            np.save(path, np.zeros(shape, stored), allow_pickle=False)
    return offsets, spans


def _decoder(processor, m: int, dim: int, dtype: str, batch_size: int):
    """The Ray Data task UDF: one shard -> its images as uint8 pixel chunks of `batch_size` rows.
    Only the processor travels to the tasks (in memory, with the function), never the weights."""

    def decode_shard(batch: dict[str, np.ndarray]):
        for root, cdir, name, version in zip(
            batch["root"], batch["cdir"], batch["shard"], batch["version"], strict=True
        ):
            root, name, version = storage.as_root(str(root)), str(name), str(version)
            if storage.is_remote(root):  # the driver gathers the rows (see the module docstring)
                offsets, spans = plan_shard(root, name, version)
            else:
                offsets, spans = _prepare(root, Path(str(cdir)), name, m, dim, dtype)
            base = {"shard": [name], "samples": [len(offsets) - 1], "total": [len(spans)]}
            if not len(spans):
                yield {**base, "row0": [0], "n": [0], "shape": [json.dumps([0])], "pixels": [b""]}
                continue
            fd = storage.open_fd(root, f"shards/{name}.tar", version)
            try:
                for r0 in range(0, len(spans), batch_size):
                    images = [
                        decode_image(os.pread(fd, int(size), int(off))) for off, size in spans[r0 : r0 + batch_size]
                    ]
                    pixels = resize_images(processor, images)
                    yield {
                        **base,
                        "row0": [r0],
                        "n": [len(images)],
                        "shape": [json.dumps(list(pixels.shape))],
                        "pixels": [pixels.tobytes()],
                    }
            finally:
                os.close(fd)

    return decode_shard


class _EncoderActor:
    """One encoder per actor: a chunk's uint8 pixels -> tokens, written into the shard's .npy rows."""

    def __init__(self, config: dict[str, Any], fingerprint: str, threads: int, cdir: str | None):
        import torch

        torch.set_num_threads(threads)
        self.encoder = load_encoder(EncoderConfig(**config))
        if self.encoder.fingerprint() != fingerprint:  # e.g. a node with other weights under the same path
            raise RuntimeError(
                f"encoder on this worker has fingerprint {self.encoder.fingerprint()}, the driver's is {fingerprint}"
            )
        if torch.cuda.is_available():
            self.encoder.to("cuda")
        self.dtype = config["dtype"]
        self.cdir = Path(cdir) if cdir else None  # None: rows go back to the driver

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for name, row0, n, shape, pixels in zip(
            batch["shard"], batch["row0"], batch["n"], batch["shape"], batch["pixels"], strict=True
        ):
            if not n:
                rows.append(b"")
                continue
            pixels = np.frombuffer(pixels, dtype=np.uint8).reshape(json.loads(shape))
            tokens = to_storage(self.encoder.encode_uint8(pixels), self.dtype)
            if self.cdir is None:
                rows.append(tokens.tobytes())
                continue
            _write_rows(tokens_path(self.cdir, str(name)), int(row0), tokens.tobytes(), tokens[0].nbytes)
            rows.append(b"")
        return {**{k: batch[k] for k in ("shard", "row0", "n", "samples", "total")}, "tokens": rows}


def _write_rows(path: Path, row0: int, data: bytes, row_bytes: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, _data_offset(fd) + row0 * row_bytes)
    finally:
        os.close(fd)


def _write_marker(cdir: Path, name: str, entry: dict[str, Any], rows: int, samples: int) -> None:
    save_json_atomic(
        marker_path(cdir, name),
        {
            "shard": name,
            "tar_sha256": entry["tar_sha256"],
            "rows": rows,
            "samples": samples,
            "bytes": tokens_path(cdir, name).stat().st_size,
        },
    )


def run_precompute(
    dataset: str | Path,
    encoder_config: EncoderConfig,
    config: PrecomputeConfig | None = None,
    *,
    ray_address: str | None = None,
    progress: bool = True,
) -> PrecomputeReport:
    """Fill `dataset`'s token cache for `encoder_config`, resuming whatever a previous run left."""

    from vpit.pipelines.token_cache import CacheError

    config = config or PrecomputeConfig()
    start = time.perf_counter()
    ds = Dataset(dataset)
    if not ds.manifest.get("complete", False):
        raise CacheError(f"{ds.root} is not completely ingested; finish `vpit ingest` (re-run it) first")
    gpus = 0
    if encoder_config.compute_dtype == "auto":  # bf16 where the actors get GPUs: ask the cluster
        import ray

        init_ray(ray_address)
        gpus = int(ray.cluster_resources().get("GPU", 0))
    encoder_config = encoder_config.resolved(gpus=gpus > 0)
    encoder = load_encoder(encoder_config)
    fp = encoder.fingerprint()
    remote = str(ds.root) if storage.is_remote(ds.root) else None
    cdir = storage.staging_dir(remote) / "tokens" / fp if remote else cache_dir(ds.root, fp)
    cdir.mkdir(parents=True, exist_ok=True)
    with FolderLock(cdir, "vpit precompute"):  # one writer per cache (per machine, for a remote one)
        return _fill(ds, cdir, fp, encoder, encoder_config, config, ray_address, progress, start, remote)


def _put_shard(cdir: Path, remote: str, fp: str, name: str) -> None:
    """A finished shard's token files, marker last; the staging copy of the tokens is then freed."""
    for path in (tokens_path(cdir, name), offsets_path(cdir, name), marker_path(cdir, name)):
        storage.put_file(path, remote, f"tokens/{fp}/{path.name}")
    tokens_path(cdir, name).unlink()


def _fill(ds, cdir, fp, encoder, encoder_config, config, ray_address, progress, start, remote=None) -> PrecomputeReport:
    from tqdm import tqdm

    from vpit.pipelines.token_cache import CacheError

    info = {
        "fingerprint": fp,
        "encoder": encoder_config.encoder,
        "revision": encoder_config.revision,
        "m": encoder.m,
        "dim": encoder.dim,
        "settings": encoder.settings(),
    }
    save_json_atomic(cdir / "fingerprint.json", info)  # first, so a partial cache can name its fix
    if remote:
        storage.put_file(cdir / "fingerprint.json", remote, f"tokens/{fp}/fingerprint.json")
    states = check_cache(ds.root, fp)
    entries = {s["name"]: s for s in ds.shards}
    todo = [s["name"] for s in ds.shards if s["name"] not in states["ok"]]
    images = 0
    encode_start = time.perf_counter()
    first: tuple[float, int] | None = None  # (time, images) when the first chunk came back
    if todo:
        import ray

        init_ray(ray_address)
        encode_start = time.perf_counter()  # images/s measures the job, not the cluster's start
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = config.actors or max(1, gpus)
        cfg = dataclasses.asdict(encoder_config)
        items = [
            {"root": str(ds.root), "cdir": str(cdir), "shard": name, "version": entries[name]["tar_sha256"]}
            for name in todo
        ]
        pipe = ray.data.from_items(items, override_num_blocks=len(items))
        # A decode worker holds torch + transformers (~0.4 GiB measured) and a chunk's pixels.
        # Declaring that memory also keeps Ray Data from fusing decoding into the encoder actor
        # (it fuses only ops with equal resource requests), so decoding overlaps the forward.
        side = encoder.model.config.image_size
        decode_memory = (512 << 20) + 3 * config.batch_size * 3 * side * side
        decode = _decoder(encoder.processor, encoder.m, encoder.dim, encoder_config.dtype, config.batch_size)
        pipe = pipe.map_batches(decode, batch_size=1, num_cpus=config.decode_cpus, memory=decode_memory)
        pipe = pipe.map_batches(
            _EncoderActor,
            batch_size=1,
            num_cpus=config.actor_cpus,
            num_gpus=1 if gpus else 0,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "config": cfg,
                "fingerprint": fp,
                "threads": max(1, round(config.actor_cpus)),
                "cdir": None if remote else str(cdir),
            },
        )
        got: dict[str, dict[int, int]] = {}  # shard -> {row0: rows}: a retried chunk counts once
        bar = tqdm(total=len(todo), desc=f"precompute {fp}", unit="shard", disable=not progress)
        for row in pipe.iter_rows():
            name, n, total = str(row["shard"]), int(row["n"]), int(row["total"])
            chunks = got.setdefault(name, {})
            if int(row["row0"]) in chunks:
                continue
            if remote:  # the driver writes the rows into the staging copy
                if not chunks:
                    _prepare(
                        ds.root, cdir, name, encoder.m, encoder.dim, encoder_config.dtype, entries[name]["tar_sha256"]
                    )
                if n:
                    data = row["tokens"]
                    _write_rows(tokens_path(cdir, name), int(row["row0"]), data, len(data) // n)
            chunks[int(row["row0"])] = n
            images += n
            first = first or (time.perf_counter(), n)
            if sum(chunks.values()) == total:
                _write_marker(cdir, name, entries[name], total, int(row["samples"]))
                if remote:
                    _put_shard(cdir, remote, fp, name)
                bar.update(1)
        bar.close()
        unfinished = [n for n in todo if not marker_path(cdir, n).exists()]  # (remote: put after the marker)
        if unfinished:
            raise CacheError(
                f"precompute left {len(unfinished)} shards unfinished ({', '.join(unfinished[:5])}); re-run it"
            )
    encode_seconds = time.perf_counter() - encode_start
    steady = 0.0
    if first and images > first[1]:
        steady = (images - first[1]) / max(time.perf_counter() - first[0], 1e-9)
    if remote:
        cache_bytes = sum(storage.list_sizes(remote, f"tokens/{fp}").values())
    else:
        cache_bytes = sum(p.stat().st_size for p in cdir.iterdir() if p.is_file() and not p.name.startswith("."))
    return PrecomputeReport(
        dataset=ds.root,
        fingerprint=fp,
        cache=storage.join(remote, "tokens", fp) if remote else cdir,
        shards_total=len(ds.shards),
        shards_skipped=len(ds.shards) - len(todo),
        shards_written=len(todo),
        images=images,
        encode_seconds=encode_seconds,
        steady_images_per_s=steady,
        seconds=time.perf_counter() - start,
        cache_bytes=cache_bytes,
        m=encoder.m,
        dim=encoder.dim,
        dtype=encoder_config.dtype,
    )
