"""The token cache: per-encoder-fingerprint visual tokens beside the shards, memory-mapped.

Layout (several fingerprints side by side):

    DATASET/tokens/<fingerprint>/fingerprint.json       the readable settings, m, d, the command
    DATASET/tokens/<fingerprint>/shard-000000.npy       (rows, m, d): one row per image, in shard
                                                        order, images in record["images"] order
    DATASET/tokens/<fingerprint>/shard-000000.offsets.npy  int64 (samples + 1,): sample p owns
                                                        rows offsets[p]:offsets[p+1]
    DATASET/tokens/<fingerprint>/shard-000000.done.json the shard's tar_sha256 and row count,
                                                        written LAST: its presence marks the shard whole

Raw .npy (not safetensors) because numpy reads it with no extra dependency, and
`np.load(allow_pickle=False)` cannot run code. numpy has no bfloat16, so bf16 caches store
the bit pattern as uint16 and reads widen it to float32 (exact). int8 caches store each token
as d int8 values followed by its scale (fp16, 2 bytes): shape (rows, m, d + 2), half the size
of fp16, dequantised as q * scale (per-token absmax scale, scale = max|x| / 127).

A reader opens a shard's token file on first use and keeps at most `DEFAULT_OPEN_SHARDS` open
(`pipelines.open_files`); one positioned read per sample, no memory map, so nothing grows
with the shards a run touches. Opening checks the file's size against its header, so a
truncated file is refused by name instead of read as garbage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vpit import storage
from vpit.errors import VpitError
from vpit.pipelines.open_files import DEFAULT_OPEN_SHARDS, OpenFiles

__all__ = [
    "CacheError",
    "TokenCache",
    "available_fingerprints",
    "cache_dir",
    "check_cache",
    "from_storage",
    "marker_path",
    "precompute_command",
    "to_storage",
    "tokens_path",
    "offsets_path",
]

STORAGE_NUMPY = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32, "int8": np.int8}
INT8_SCALE_BYTES = 2  # an fp16 scale after each int8 token


def stored_shape(rows: int, m: int, dim: int, dtype: str) -> tuple[int, int, int]:
    """The .npy shape of `rows` images of m x dim tokens in storage type `dtype`."""
    return (rows, m, dim + INT8_SCALE_BYTES) if dtype == "int8" else (rows, m, dim)


class CacheError(VpitError):
    """The cache asked for is missing, stale or partial; the message says what and how to fix it."""


def cache_dir(dataset_root: str | Path, fingerprint: str) -> Path:
    """The cache's local folder (for a remote dataset: a URL string)."""
    return storage.join(storage.as_root(dataset_root), "tokens", fingerprint)


def tokens_path(cdir: Path, name: str) -> Path:
    return cdir / f"{name}.npy"


def offsets_path(cdir: Path, name: str) -> Path:
    return cdir / f"{name}.offsets.npy"


def marker_path(cdir: Path, name: str) -> Path:
    return cdir / f"{name}.done.json"


def from_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored tokens -> float32 (a copy). bf16 is the top half of a float32's bits."""
    if dtype == "bf16":
        return (np.asarray(arr, dtype=np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        scale = np.ascontiguousarray(arr[..., -INT8_SCALE_BYTES:]).view(np.float16).astype(np.float32)
        return arr[..., :-INT8_SCALE_BYTES].astype(np.float32) * scale
    return np.array(arr, dtype=np.float32)


def to_storage(tokens, dtype: str) -> np.ndarray:
    """A float torch tensor (n, m, d) -> the numpy array the cache stores (bf16 rounded and kept
    as uint16 bits; int8 with a per-token fp16 scale appended)."""
    import torch

    if dtype == "int8":
        x = tokens.float()
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30).half()  # rounded first:
        q = torch.round(x / scale.float()).clamp(-127, 127).to(torch.int8)  # q uses the stored scale
        out = np.empty((*q.shape[:-1], q.shape[-1] + INT8_SCALE_BYTES), dtype=np.int8)
        out[..., :-INT8_SCALE_BYTES] = q.numpy()
        out[..., -INT8_SCALE_BYTES:] = scale.numpy().view(np.int8)
        return out
    t = tokens.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    if dtype == "bf16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def precompute_command(dataset_root: str | Path, info: dict[str, Any]) -> str:
    """The `vpit precompute` call that (re)builds the cache described by `info` (fingerprint.json)."""
    s = info["settings"]
    parts = ["vpit precompute", str(dataset_root), "--encoder", info["encoder"]]
    if info.get("revision"):
        parts += ["--revision", info["revision"]]
    parts += ["--tokens", str(s["tokens"]), "--dtype", s["dtype"], "--compute-dtype", s["compute_dtype"]]
    defaults = {"layer": -1, "pooling": "bilinear", "normalize": "l2"}
    for key, default in defaults.items():
        if s[key] != default:
            parts += [f"--{key.replace('_', '-')}", str(s[key])]
    return " ".join(parts)


def _load_manifest(root: str | Path) -> dict[str, Any]:
    from vpit.pipelines.shards import load_manifest

    manifest = load_manifest(root)
    if manifest is None:
        raise CacheError(f"{root} holds no manifest.json: is it a vpit dataset (vpit ingest ...)?")
    return manifest


def _read_json(root: str | Path, rel: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(root, rel))
    except FileNotFoundError:
        return None


def _shard_state(
    root: str | Path,
    rel: str,
    entry: dict[str, Any],
    sizes: dict[str, int],
    done: dict[str, Any] | None,
    m: int,
    dim: int,
    dtype: str,
) -> str:
    """'ok', 'missing', 'stale' (written for another version of the shard) or 'partial'.
    `sizes`: the cache folder's files and their sizes (one listing for the whole cache);
    `done`: the shard's marker, if any."""
    name = entry["name"]
    data, offs = f"{name}.npy", f"{name}.offsets.npy"
    if done is None:
        return "partial" if data in sizes or offs in sizes else "missing"
    if done.get("tar_sha256") != entry["tar_sha256"]:
        return "stale"
    if data not in sizes or offs not in sizes:
        return "partial"
    if sizes[data] != done["bytes"]:  # truncated or grown behind our back
        return "partial"
    if storage.is_remote(root):  # an object is whole or absent (PUT is atomic), its size is checked above
        return "ok" if done.get("rows") is not None else "partial"
    data = tokens_path(Path(root, rel), name)
    try:
        with open(data, "rb") as f:  # the header only: shape and dtype, no payload read
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, _, stored = read(f)
    except (ValueError, OSError):
        return "partial"
    return "ok" if shape == stored_shape(done["rows"], m, dim, dtype) and stored == STORAGE_NUMPY[dtype] else "partial"


def check_cache(dataset_root: str | Path, fingerprint: str) -> dict[str, list[str]]:
    """Shard names per state ('ok', 'missing', 'stale', 'partial'); all 'missing' if no cache yet."""
    root = storage.as_root(dataset_root)
    manifest = _load_manifest(root)
    rel = f"tokens/{fingerprint}"
    states: dict[str, list[str]] = {"ok": [], "missing": [], "stale": [], "partial": []}
    info = _read_json(root, f"{rel}/fingerprint.json")
    if info is None:
        states["missing"] = [s["name"] for s in manifest["shards"]]
        return states
    sizes = storage.list_sizes(root, rel)
    markers = storage.read_many(root, [f"{rel}/{n}" for n in sizes if n.endswith(".done.json")])  # S3: concurrent
    for entry in manifest["shards"]:
        done = markers.get(f"{rel}/{entry['name']}.done.json")
        done = json.loads(done) if done is not None else None
        state = _shard_state(root, rel, entry, sizes, done, info["m"], info["dim"], info["settings"]["dtype"])
        states[state].append(entry["name"])
    return states


def available_fingerprints(dataset_root: str | Path) -> list[str]:
    """Fingerprints whose cache is complete and matches the dataset as it is now, sorted."""
    root = storage.as_root(dataset_root)
    if storage.is_remote(root):
        fs, path = storage.filesystem(str(storage.join(root, "tokens")))
        try:
            names = sorted(e.rsplit("/", 1)[-1] for e in fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return []
    else:
        base = Path(root) / "tokens"
        names = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
    out = []
    for name in names:
        if storage.exists(root, f"tokens/{name}/fingerprint.json"):
            states = check_cache(root, name)
            if not (states["missing"] or states["stale"] or states["partial"]):
                out.append(name)
    return out


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class TokenCache:
    """Read a dataset's token cache for one fingerprint: one positioned read per sample.

    Args:
        dataset_root: the dataset folder (holds manifest.json).
        fingerprint: the encoder fingerprint (`vpit precompute` prints it; `available_fingerprints`).
        shard_names: the dataset's shard names in manifest order (read from the manifest when absent).
        verified: the caller checked the whole cache already (the planner does, once per run), so
            only each shard's file size is checked when it is opened.
        open_shards: token files kept open at most.
        files: an LRU shared with other readers (closed by its owner); default: one of our own.
        versions: each shard's tar_sha256, naming a remote shard's token file in the node cache.

    Raises:
        CacheError: the cache is missing, stale (the dataset changed since) or partial; the
            message names the shards and the command that fixes it.
    """

    def __init__(
        self,
        dataset_root: str | Path,
        fingerprint: str,
        *,
        shard_names: tuple[str, ...] | None = None,
        verified: bool = False,
        open_shards: int = DEFAULT_OPEN_SHARDS,
        files: OpenFiles | None = None,
        versions: tuple[str, ...] = (),
    ):
        self.root = storage.as_root(dataset_root)
        self.fingerprint = fingerprint
        self.dir = cache_dir(self.root, fingerprint)
        self.rel = f"tokens/{fingerprint}"
        self.versions = versions
        try:  # immutable for its fingerprint: on object storage a cached copy serves every loader worker
            with storage.open_file(self.root, f"{self.rel}/fingerprint.json", fingerprint) as f:
                info = json.loads(f.read())
        except FileNotFoundError:
            info = None
        if info is None:
            have = available_fingerprints(self.root)
            raise CacheError(
                f"{self.root} has no token cache with fingerprint {fingerprint} (all shards missing); "
                f"available: {', '.join(have) or 'none'}. Build it with `vpit precompute {self.root} --encoder ENCODER "
                "--tokens M --dtype fp16|bf16|int8`, using the encoder settings that print this fingerprint"
            )
        self.fix = precompute_command(self.root, info)
        if not verified:
            states = check_cache(self.root, fingerprint)
            bad = [(k, states[k]) for k in ("missing", "stale", "partial") if states[k]]
            if bad:
                what = "; ".join(f"{k}: {_names(v)}" for k, v in bad)
                raise CacheError(
                    f"token cache {fingerprint} of {self.root} is not usable ({what}; stale = written for another "
                    f"version of the shard). Fix it with: {self.fix}"
                )
        self.info: dict[str, Any] = info["settings"]
        self.m: int = info["m"]
        self.dim: int = info["dim"]
        self.dtype: str = self.info["dtype"]
        self.names = (
            list(shard_names) if shard_names is not None else [s["name"] for s in _load_manifest(self.root)["shards"]]
        )
        self.own = files is None
        self.files = OpenFiles(capacity=open_shards) if files is None else files

    def _open(self, shard: int) -> tuple[int, tuple[np.ndarray, int, tuple[int, ...]]]:
        """A shard's token file: its descriptor, row offsets, data offset and row shape."""
        name = self.names[shard]
        version = f"{self.fingerprint}:{self.versions[shard] if self.versions else ''}"
        where = storage.join(self.root, self.rel, f"{name}.offsets.npy")
        try:
            with storage.open_file(self.root, f"{self.rel}/{name}.offsets.npy", version) as f:
                offsets = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CacheError(f"{where} is not readable ({e}). Fix it with: {self.fix}") from None
        path = storage.join(self.root, self.rel, f"{name}.npy")
        fd = storage.open_fd(self.root, f"{self.rel}/{name}.npy", version)
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                fmt = np.lib.format
                read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                shape, _, stored = read(f)
                data_offset = f.tell()
            expected = stored_shape(int(offsets[-1]), self.m, self.dim, self.dtype)
            size = data_offset + int(np.prod(expected)) * np.dtype(stored).itemsize
            if shape != expected or stored != STORAGE_NUMPY[self.dtype] or os.fstat(fd).st_size != size:
                raise CacheError(
                    f"{path} is damaged (shape {shape}, {os.fstat(fd).st_size} bytes; expected {expected}, "
                    f"{size} bytes). Fix it with: {self.fix}"
                )
        except (ValueError, OSError) as e:
            os.close(fd)
            raise CacheError(f"{path} is not a readable token file ({e}). Fix it with: {self.fix}") from None
        except CacheError:
            os.close(fd)
            raise
        return fd, (offsets, data_offset, expected[1:])

    def _use(self, shard: int):
        return self.files.use((str(self.dir), self.names[shard]), lambda key: self._open(shard))

    def rows(self, shard: int, position: int) -> tuple[int, int]:
        """The [start, end) rows of sample `position` of `shard` in that shard's token array."""
        with self._use(shard) as (_, (offsets, _, _)):
            if not 0 <= position < len(offsets) - 1:
                raise IndexError(f"{self.names[shard]} has {len(offsets) - 1} samples, asked for position {position}")
            return int(offsets[position]), int(offsets[position + 1])

    def tokens(self, shard: int, position: int) -> np.ndarray:
        """Float32 (n_images, m, d) for one sample, images in record["images"] order; (0, m, d) for text-only."""
        with self._use(shard) as (fd, (offsets, data_offset, row_shape)):
            if not 0 <= position < len(offsets) - 1:
                raise IndexError(f"{self.names[shard]} has {len(offsets) - 1} samples, asked for position {position}")
            start, end = int(offsets[position]), int(offsets[position + 1])
            dtype = np.dtype(STORAGE_NUMPY[self.dtype])
            row_bytes = int(np.prod(row_shape)) * dtype.itemsize
            buf = os.pread(fd, (end - start) * row_bytes, data_offset + start * row_bytes)
        if len(buf) != (end - start) * row_bytes:
            raise CacheError(
                f"{storage.join(self.root, self.rel, self.names[shard] + '.npy')} ends early. Fix it with: {self.fix}"
            )
        return from_storage(np.frombuffer(buf, dtype=dtype).reshape(end - start, *row_shape), self.dtype)

    def close(self) -> None:
        if self.own:
            self.files.close()

    def __repr__(self) -> str:
        return f"TokenCache({str(self.root)!r}, {self.fingerprint!r}: m={self.m}, d={self.dim}, {self.dtype})"
