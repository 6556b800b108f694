"""Where datasets live: a local folder, or object storage (s3://, gs://, hf://) through fsspec.

A dataset root is a local path or a URL. Everything that reads a dataset asks for a file by its
root and its relative path (`open_file`, `read_bytes`): for a local root that is the file itself;
for a remote root, small metadata (manifests, markers) is read straight from the store, and the
large files (shard indexes, records, tars, token files) come through a `NodeCache`, one whole
object at a time, so the readers keep using `os.pread` on local files.

Credentials and endpoints are the provider's own configuration, read by the provider's library
(for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or a
profile or instance role); vpit adds none of its own.

Object stores have no rename, but a PUT is atomic: an object is either absent or whole. Writers
therefore put each object whole (from a finished local file), then the object that marks it done
(a shard's index after its tar, a token file's marker after the tokens), so "complete" is decided
exactly as on a local disk: by the presence of the marker written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import BinaryIO

from vpit.errors import InputError

__all__ = [
    "NodeCache",
    "as_root",
    "exists",
    "filesystem",
    "is_remote",
    "join",
    "list_sizes",
    "open_fd",
    "open_file",
    "node_cache",
    "put_bytes",
    "put_file",
    "read_bytes",
    "read_many",
    "read_ranges",
    "remove",
    "staging_dir",
]

DEFAULT_CACHE_BYTES = 64 << 30
WAIT_FOR_SPACE_S = 600.0  # a download waits this long for others to free the space it needs


def is_remote(root: str | Path) -> bool:
    """Whether `root` names object storage (a URL with a scheme other than file://)."""
    s = str(root)
    return "://" in s and not s.startswith("file://")


def as_root(root: str | Path, base: Path | None = None) -> str | Path:
    """A dataset root as the code keeps it: a URL stays a string (pathlib would fold its //),
    a local path becomes an absolute Path (relative to `base` when given)."""
    if is_remote(root):
        return str(root).rstrip("/")
    p = Path(str(root).removeprefix("file://"))
    return ((base / p) if base is not None else p).resolve()


def join(root: str | Path, *parts: str) -> str | Path:
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return Path(root).joinpath(*parts)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; the provider's library reads its own config."""
    import fsspec

    try:
        # No listing cache: a listing taken before a shard was put would hide it from every later
        # lookup in this process (s3fs answers `size` from a cached listing of the folder).
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        hint = {"gs": "pip install gcsfs", "gcs": "pip install gcsfs", "s3": "pip install s3fs"}.get(scheme, "")
        raise InputError(f"{url}: no filesystem for {scheme}:// ({e}){'; ' + hint if hint else ''}") from None


def read_bytes(root: str | Path, rel: str) -> bytes:
    """A small file of a dataset, read whole (no cache: manifests and markers change)."""
    if not is_remote(root):
        return Path(root, rel).read_bytes()
    fs, path = filesystem(str(join(root, rel)))
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(str(join(root, rel))) from None


def read_ranges(root: str | Path, spans: list[tuple[str, int, int]]) -> list[bytes]:
    """Byte ranges (rel, offset, size) of a dataset's files; on object storage as concurrent
    ranged GETs (no whole object fetched), for reading a few records spread over many shards."""
    if not is_remote(root):
        out = []
        for rel, offset, size in spans:
            with open(Path(root, rel), "rb") as f:
                f.seek(offset)
                out.append(f.read(size))
        return out
    if not spans:
        return []
    fs, _ = filesystem(str(root))
    paths = [filesystem(str(join(root, rel)))[1] for rel, _, _ in spans]
    return fs.cat_ranges(paths, [o for _, o, _ in spans], [o + n for _, o, n in spans])


def read_many(root: str | Path, rels: list[str]) -> dict[str, bytes]:
    """Small files of a dataset, read whole; the absent ones are left out (S3: concurrent GETs)."""
    if not is_remote(root):
        return {rel: Path(root, rel).read_bytes() for rel in rels if Path(root, rel).is_file()}
    if not rels:
        return {}
    fs, _ = filesystem(str(root))
    paths = {filesystem(str(join(root, rel)))[1]: rel for rel in rels}
    got = fs.cat(list(paths), on_error="omit")
    return {paths[p]: data for p, data in got.items() if isinstance(data, bytes)}


def exists(root: str | Path, rel: str) -> bool:
    if not is_remote(root):
        return Path(root, rel).exists()
    fs, path = filesystem(str(join(root, rel)))
    return fs.exists(path)


def list_sizes(root: str | Path, rel: str) -> dict[str, int]:
    """{file name: size} of the files directly in ROOT/rel; {} when there is no such folder.
    One listing call per 1000 objects on S3, instead of one request per file."""
    if not is_remote(root):
        folder = Path(root, rel)
        if not folder.is_dir():
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file()}
    fs, path = filesystem(str(join(root, rel)))
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e["type"] == "file"}


def put_file(local: Path, root: str | Path, rel: str) -> None:
    """Upload a finished local file as one object (whole or absent: a PUT is atomic)."""
    fs, path = filesystem(str(join(root, rel)))
    fs.put_file(str(local), path)


def put_bytes(root: str | Path, rel: str, data: bytes) -> None:
    fs, path = filesystem(str(join(root, rel)))
    fs.pipe_file(path, data)


def remove(root: str | Path, rels: list[str]) -> None:
    if not rels:
        return
    if not is_remote(root):
        for rel in rels:
            Path(root, rel).unlink(missing_ok=True)
        return
    fs, _ = filesystem(str(root))
    fs.rm([filesystem(str(join(root, rel)))[1] for rel in rels])


def staging_dir(url: str) -> Path:
    """The local folder a job writes a remote output through before putting it (beside the
    node cache, VPIT_CACHE_DIR/../staging)."""
    return node_cache().dir.parent / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


def open_file(root: str | Path, rel: str, version: str = "") -> BinaryIO:
    """A dataset file opened for reading: the file itself for a local root, else a whole copy in
    this node's cache. `version` names the content (e.g. the shard's tar_sha256): a new version of
    an object is a new cache entry, and a warm read needs no request to the store. The copy is
    opened before the cache's lock is let go, so an eviction can never remove it first."""
    if not is_remote(root):
        return open(Path(root, rel), "rb")
    return node_cache().open(str(join(root, rel)), version)


def open_fd(root: str | Path, rel: str, version: str = "") -> int:
    """Like `open_file`, as a raw descriptor (for os.pread), to be closed by the caller."""
    with open_file(root, rel, version) as f:
        return os.dup(f.fileno())


class NodeCache:
    """Whole remote objects in a local folder with a size bound, shared by the processes of a node.

    Every loader worker and rank on a node uses the same folder (VPIT_CACHE_DIR, default
    ~/.cache/vpit/remote) and the same bound (VPIT_CACHE_BYTES, e.g. 200G; default 64G). Entries are
    named by a hash of (URL, version), so a hit is one stat. Before a download, space is
    reserved under a file lock (fcntl, so all the node's processes agree): least recently used
    entries are deleted until the cached bytes plus every pending reservation plus this object
    fit, and a download that cannot fit yet waits for others to finish. The folder therefore never
    holds more than the bound, downloads in flight included. Entries are opened under the same
    lock, so a reader always gets its file; one deleted while a reader still has it open stays
    readable through its descriptor (POSIX; its blocks are freed when the reader closes it).

    Our own ~80 lines: fsspec's caching filesystems (filecache, simplecache) have no size bound
    that holds across the processes of a node.
    """

    def __init__(self, folder: str | Path, max_bytes: int):
        self.dir = Path(folder)
        self.objects = self.dir / "objects"
        self.reserved = self.dir / "reserved"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.reserved.mkdir(exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.fetched = 0  # downloads by this object (misses), for tests and benches

    def entry(self, url: str, version: str = "") -> Path:
        key = hashlib.sha256(f"{url}\0{version}".encode()).hexdigest()[:32]
        return self.objects / f"{key}-{url.rsplit('/', 1)[-1]}"

    @contextlib.contextmanager
    def _locked(self):
        with open(self.dir / "lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def open(self, url: str, version: str = "") -> BinaryIO:
        """The object at `url` (version `version`), opened from the cache; downloaded on a miss."""
        path = self.entry(url, version)
        with self._locked():
            f = _open_and_touch(path)  # a hit: opened before any evictor can remove it
            if f is not None:
                return f
        fs, rpath = filesystem(url)
        try:
            size = int(fs.size(rpath))
        except FileNotFoundError:
            raise FileNotFoundError(url) from None
        if size > self.max_bytes:
            raise InputError(
                f"{url} is {size:,} bytes, more than the node cache's bound of {self.max_bytes:,} "
                "(VPIT_CACHE_BYTES); raise the bound"
            )
        tag = f"{os.getpid()}-{threading.get_ident()}"
        deadline = time.monotonic() + WAIT_FOR_SPACE_S
        while True:  # other downloads in flight may hold the space: wait for them
            with self._locked():
                f = _open_and_touch(path)  # another process or thread fetched it meanwhile
                if f is not None:
                    return f
                if self._evict(size):
                    ticket = _Reservation(self.reserved / f"{path.name}.{tag}", size)
                    break
            if time.monotonic() > deadline:
                raise InputError(
                    f"the node cache {self.dir} could not fit {size:,} more bytes under its bound of "
                    f"{self.max_bytes:,} (VPIT_CACHE_BYTES) for {WAIT_FOR_SPACE_S:.0f} s: downloads in flight "
                    "hold the rest; raise the bound"
                )
            time.sleep(0.02)
        part = path.with_name(f"{path.name}.part-{tag}")
        try:
            fs.get_file(rpath, str(part))
            with self._locked():
                f = open(part, "rb")  # noqa: SIM115 - handed to the caller
                os.replace(part, path)
        finally:
            with self._locked():
                part.unlink(missing_ok=True)
                ticket.release()
        self.fetched += 1
        return f

    def _evict(self, incoming: int) -> bool:
        """Delete least recently used entries until `incoming` more bytes fit (under the lock);
        False when they cannot fit yet because downloads in flight hold the space."""
        reserved = 0
        for ticket in list(self.reserved.iterdir()):
            size = _Reservation.held_size(ticket)
            if size is None:  # its download's process is gone (no lock on it): reservation and part go
                base, tag = ticket.name.rsplit(".", 1)
                (self.objects / f"{base}.part-{tag}").unlink(missing_ok=True)
                ticket.unlink(missing_ok=True)
                continue
            reserved += size
        done = []
        for e in os.scandir(self.objects):
            if _PART.search(e.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = e.stat()
                done.append((st.st_mtime_ns, st.st_size, e.path))
        done.sort()
        used = sum(s for _, s, _ in done) + reserved
        for _, size, p in done:
            if used + incoming <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            used -= size
        return used + incoming <= self.max_bytes


_PART = re.compile(r"\.part-\d+-\d+$")


def _open_and_touch(path: Path) -> BinaryIO | None:
    try:
        f = open(path, "rb")  # noqa: SIM115 - handed to the caller
    except FileNotFoundError:
        return None
    os.utime(path)  # recently used
    return f


class _Reservation:
    """Space reserved for one download: a file holding its size, locked (flock) by the downloading
    process for as long as it runs. A reservation nobody holds the lock of belongs to a process
    that died: the kernel dropped its lock (this holds across PID namespaces, unlike a pid check)."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.write(self.fd, str(size).encode())

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)

    @staticmethod
    def held_size(path: Path) -> int | None:
        """The reserved bytes, or None when no live process holds the reservation."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its download is running
                return int(os.pread(fd, 32, 0) or 0)
            return None
        finally:
            os.close(fd)


def parse_bytes(text: str) -> int:
    """'200G', '512M', '1.5T' or a plain number of bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise InputError(f"VPIT_CACHE_BYTES: expected a size such as 200G or 512M, got {text!r}") from None


_caches: dict[tuple[str, int], NodeCache] = {}
_caches_lock = threading.Lock()


def node_cache() -> NodeCache:
    """This node's cache, as the environment configures it (VPIT_CACHE_DIR, VPIT_CACHE_BYTES)."""
    folder = os.environ.get("VPIT_CACHE_DIR") or str(Path.home() / ".cache" / "vpit" / "remote")
    bound = parse_bytes(os.environ["VPIT_CACHE_BYTES"]) if os.environ.get("VPIT_CACHE_BYTES") else DEFAULT_CACHE_BYTES
    with _caches_lock:
        if (folder, bound) not in _caches:
            _caches[(folder, bound)] = NodeCache(folder, bound)
        return _caches[(folder, bound)]
