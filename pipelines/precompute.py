"""The precompute job: every image of a dataset -> its m visual tokens, once, as a Ray Data job.

The work is cut into chunks before anything runs: chunk = up to `batch_size` consecutive
image rows of one shard. A CPU task decodes and preprocesses a chunk; an actor pool (one
encoder per actor, `num_gpus=1` each when the cluster has GPUs) runs the whole chunk as one
forward and writes its rows straight into the shard's preallocated .npy, at rows fixed by
the plan. Each image's numbers therefore depend only on its chunk, never on the number of
actors or on scheduling; actors pin torch to a fixed thread count for the same reason.
The driver only counts rows; once a shard's rows are all in, it writes the shard's marker
(last). A re-run skips shards whose marker matches the shard's tar_sha256 and redoes the
rest from scratch, so a killed job resumes with no duplicate and no loss.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from vpit.common import init_ray, save_json_atomic
from vpit.errors import ConfigError
from vpit.model.encoder import EncoderConfig, VisionEncoder, decode_image, load_encoder, preprocess_images
from vpit.pipelines.shards import Dataset
from vpit.pipelines.token_cache import (
    STORAGE_NUMPY,
    cache_dir,
    check_cache,
    marker_path,
    offsets_path,
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


def plan_shard(root: Path, name: str) -> tuple[np.ndarray, list[list[int]]]:
    """A shard's row offsets (samples + 1) and the [offset, size] of every image in row order.

    Row order is sample order, then record["images"] order; the records are read from the
    tar through the index (one small read each), since the index alone does not fix the order.
    """
    index = json.loads((root / "shards" / f"{name}.idx.json").read_text(encoding="utf-8"))
    offsets = [0]
    spans: list[list[int]] = []
    with open(root / index["tar"], "rb") as tar:
        for entry in index["samples"]:
            members = entry["members"]
            tar.seek(members["json"][0])
            record = json.loads(tar.read(members["json"][1]))
            spans += [members[img["member"]] for img in record["images"]]
            offsets.append(len(spans))
    return np.asarray(offsets, dtype=np.int64), spans


def _decoder(processor):
    """The Ray Data task UDF: a chunk's image bytes -> pixel values with the encoder's own processor.
    Only the processor travels to the tasks (in memory, with the function), never the weights."""

    def decode_chunk(row: dict[str, Any]) -> dict[str, Any]:
        images = []
        with open(row["tar"], "rb") as f:
            for offset, size in json.loads(row["spans"]):
                f.seek(offset)
                images.append(decode_image(f.read(size)))
        return {
            "path": row["path"],
            "shard": row["shard"],
            "row0": row["row0"],
            "pixels": preprocess_images(processor, images),
        }

    return decode_chunk


class _EncoderActor:
    """One encoder per actor: a chunk's pixels -> tokens, written into the shard's .npy rows."""

    def __init__(self, config: dict[str, Any], fingerprint: str, threads: int):
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_rows = []
        for path, row0, pixels in zip(batch["path"], batch["row0"], batch["pixels"], strict=True):
            tokens = to_storage(self.encoder.encode_pixels(np.asarray(pixels)), self.dtype)
            out = np.lib.format.open_memmap(str(path), mode="r+")
            out[int(row0) : int(row0) + len(tokens)] = tokens
            out.flush()
            del out
            n_rows.append(len(tokens))
        return {"shard": batch["shard"], "rows": np.asarray(n_rows, dtype=np.int64)}


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


def _prepare(root: Path, cdir: Path, encoder: VisionEncoder, entry: dict[str, Any]) -> tuple[int, list[list[int]]]:
    """Reset one shard's cache files: offsets, a zero-filled token array; the marker goes first."""
    name = entry["name"]
    marker_path(cdir, name).unlink(missing_ok=True)  # from now on the shard reads as partial
    offsets, spans = plan_shard(root, name)
    tmp = offsets_path(cdir, name).with_suffix(".tmp.npy")
    np.save(tmp, offsets, allow_pickle=False)
    tmp.replace(offsets_path(cdir, name))
    shape = (len(spans), encoder.m, encoder.dim)
    dtype = STORAGE_NUMPY[encoder.config.dtype]
    if spans:
        np.lib.format.open_memmap(str(tokens_path(cdir, name)), mode="w+", dtype=dtype, shape=shape).flush()
    else:
        np.save(tokens_path(cdir, name), np.zeros(shape, dtype), allow_pickle=False)
    return len(offsets) - 1, spans


def run_precompute(
    dataset: str | Path,
    encoder_config: EncoderConfig,
    config: PrecomputeConfig | None = None,
    *,
    ray_address: str | None = None,
    progress: bool = True,
) -> PrecomputeReport:
    """Fill `dataset`'s token cache for `encoder_config`, resuming whatever a previous run left."""
    from tqdm import tqdm

    from vpit.pipelines.token_cache import CacheError

    config = config or PrecomputeConfig()
    start = time.perf_counter()
    ds = Dataset(dataset)
    if not ds.manifest.get("complete", False):
        raise CacheError(f"{ds.root} is not completely ingested; finish `vpit ingest` (re-run it) first")
    encoder = load_encoder(encoder_config)
    fp = encoder.fingerprint()
    cdir = cache_dir(ds.root, fp)
    cdir.mkdir(parents=True, exist_ok=True)
    info = {
        "fingerprint": fp,
        "encoder": encoder_config.encoder,
        "revision": encoder_config.revision,
        "m": encoder.m,
        "dim": encoder.dim,
        "settings": encoder.settings(),
    }
    save_json_atomic(cdir / "fingerprint.json", info)  # first, so a partial cache can name its fix
    states = check_cache(ds.root, fp)
    entries = {s["name"]: s for s in ds.shards}
    todo = [s for s in ds.shards if s["name"] not in states["ok"]]
    chunks, expected, samples = [], {}, {}
    for entry in todo:
        name = entry["name"]
        samples[name], spans = _prepare(ds.root, cdir, encoder, entry)
        expected[name] = len(spans)
        if not spans:
            _write_marker(cdir, name, entry, 0, samples[name])
        for r0 in range(0, len(spans), config.batch_size):
            chunks.append(
                {
                    "shard": name,
                    "path": str(tokens_path(cdir, name)),
                    "tar": str(ds.root / "shards" / f"{name}.tar"),
                    "row0": r0,
                    "spans": json.dumps(spans[r0 : r0 + config.batch_size]),
                }
            )
    images = sum(expected.values())
    encode_start = time.perf_counter()
    if chunks:
        import ray

        init_ray(ray_address)
        encode_start = time.perf_counter()  # images/s measures the job, not the cluster's start
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = config.actors or max(1, gpus)
        cfg = dataclasses.asdict(encoder_config)
        pipe = ray.data.from_items(chunks, override_num_blocks=len(chunks))
        # A decode worker holds torch + transformers (~0.4 GiB measured) and a chunk's pixels.
        # Declaring that memory also keeps Ray Data from fusing decoding into the encoder actor
        # (it fuses only ops with equal resource requests), so decoding overlaps the forward.
        side = encoder.model.config.image_size
        decode_memory = (512 << 20) + 3 * config.batch_size * 3 * side * side * 4
        pipe = pipe.map(_decoder(encoder.processor), num_cpus=config.decode_cpus, memory=decode_memory)
        pipe = pipe.map_batches(
            _EncoderActor,
            batch_size=1,
            num_cpus=config.actor_cpus,
            num_gpus=1 if gpus else 0,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"config": cfg, "fingerprint": fp, "threads": max(1, round(config.actor_cpus))},
        )
        got: Counter = Counter()
        first: tuple[float, int] | None = None  # (time, images) when the first chunk came back
        bar = tqdm(total=images, desc=f"precompute {fp}", unit="img", disable=not progress)
        for row in pipe.iter_rows():
            name = str(row["shard"])
            got[name] += int(row["rows"])
            bar.update(int(row["rows"]))
            first = first or (time.perf_counter(), int(row["rows"]))
            if got[name] == expected[name]:
                _write_marker(cdir, name, entries[name], expected[name], samples[name])
        bar.close()
    encode_seconds = time.perf_counter() - encode_start
    steady = 0.0
    if chunks and images > first[1]:
        steady = (images - first[1]) / max(time.perf_counter() - first[0], 1e-9)
    cache_bytes = sum(p.stat().st_size for p in cdir.iterdir() if p.is_file())
    return PrecomputeReport(
        dataset=ds.root,
        fingerprint=fp,
        cache=cdir,
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
