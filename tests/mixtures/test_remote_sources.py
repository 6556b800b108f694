"""A mixture whose sources live on S3 (moto's server on 127.0.0.1) streams exactly what the same
data on local disk streams, through a node cache that never grows past its bound."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tests.mixtures.conftest import spec_text
from tests.mixtures.helpers import upload_folder
from vpit import storage
from vpit.mixtures import heldout_items, load_spec, make_plan
from vpit.mixtures.stream import MixtureStream
from vpit.storage import NodeCache, node_cache

B = 12


def _cache_bytes(folder: Path) -> int:
    total = 0
    for e in os.scandir(folder):
        try:
            total += e.stat().st_size
        except FileNotFoundError:  # evicted between the listing and the stat
            pass
    return total


class _Watcher(threading.Thread):
    """Samples the size of a cache folder (complete entries and downloads in flight) until stopped."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.peak, self.samples, self.done = folder, 0, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            if self.folder.is_dir():
                self.peak = max(self.peak, _cache_bytes(self.folder))
                self.samples += 1

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def _stream(spec_path: Path, world: int, workers: int = 0) -> tuple[list[dict], object]:
    plan = make_plan(load_spec(spec_path))
    items = []
    for rank in range(world):
        stream = MixtureStream(plan, global_batch_size=B, rank=rank, world_size=world, prefetch_batches=2)
        for k, batch in enumerate(stream.loader(num_workers=workers)):
            items += [dict(it, step=k) for it in batch]
    return sorted(items, key=lambda it: it["index"]), plan


@pytest.mark.parametrize("split", ["plain", "heldout+dedup"])
def test_a_mixture_on_s3_streams_the_same_sequence_as_on_local_disk(mix_data, s3, tmp_path, monkeypatch, split):
    url, _ = s3
    upload_folder(mix_data["mix"], f"{url}/mix")
    fp = mix_data["fingerprint"]
    text = spec_text(fp, und=25, gen=14, edit=5, seed=3)
    if split != "plain":  # the held-out split by image and dedup read the catalog arrays from S3
        text += "heldout: {fraction: 0.1}\ndedup: exact\n"
    local_spec = mix_data["root"] / f"spec-local-for-s3-{split}.yaml"
    local_spec.write_text(text)
    remote_spec = tmp_path / "spec.yaml"
    remote_spec.write_text(text.replace("path: mix,", f"path: {url}/mix,"))

    # The bound: twice the largest object training fetches (never a tar: records come from the
    # parquet files), so objects are evicted and fetched again while the stream runs.
    sizes = fsspec.filesystem("s3").du(f"{url.removeprefix('s3://')}/mix", total=False)
    fetched = {k: v for k, v in sizes.items() if not k.endswith((".tar", ".json", ".jsonl", ".md"))}
    bound = 2 * max(fetched.values()) + 1
    assert sum(fetched.values()) > 2 * bound
    monkeypatch.setenv("VPIT_CACHE_BYTES", str(bound))
    cache = node_cache()

    local, local_plan = _stream(local_spec, world=1)
    watcher = _Watcher(cache.objects)
    watcher.start()
    try:
        remote, remote_plan = _stream(remote_spec, world=2)  # cold cache, two ranks
        cold = cache.fetched
        warm, _ = _stream(remote_spec, world=1, workers=2)  # two loader processes share the node cache
    finally:
        peak = watcher.stop()
    assert remote_plan.hash == local_plan.hash  # where the data lives is not part of the plan
    assert len(local) == remote_plan.total == len(remote) == len(warm)
    for a, b, c in zip(local, remote, warm):
        assert a["id"] == b["id"] == c["id"] and a["index"] == b["index"] == c["index"]
        assert a["record"] == b["record"] == c["record"]
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["tokens"], c["tokens"])
        assert "skipped" not in b and "skipped" not in c
    assert cold > len(fetched) // 2  # objects were evicted and fetched again
    assert watcher.samples > 10
    assert 0 < peak <= bound
    assert not any(n.endswith(".tar") for n in os.listdir(cache.objects)), "training fetched an image tar"
    if split != "plain":
        held_local = heldout_items(load_spec(local_spec))
        held_remote = heldout_items(load_spec(remote_spec))
        assert [it["id"] for it in held_local] == [it["id"] for it in held_remote] and held_local
        np.testing.assert_array_equal(held_local[0]["tokens"], held_remote[0]["tokens"])


def test_the_node_cache_holds_its_bound_across_processes_and_threads(s3, tmp_path):
    """Two processes of four threads each fetch 24 objects of 20-120 kB in random order through one
    cache folder bounded at 400 kB; a watcher samples the folder throughout."""
    url, env = s3
    fs, bucket = fsspec.core.url_to_fs(url)
    rng = np.random.default_rng(0)
    payloads = {f"obj-{i:02d}.bin": rng.bytes(int(rng.integers(20_000, 120_000))) for i in range(24)}
    for name, data in payloads.items():
        fs.pipe_file(f"{bucket}/{name}", data)
    folder, bound = tmp_path / "shared-cache", 400_000
    NodeCache(folder, bound)  # creates the layout the watcher samples
    script = f"""
import sys, threading, numpy as np
from vpit.storage import NodeCache
cache = NodeCache({str(folder)!r}, {bound})
names = {sorted(payloads)!r}
def work(seed):
    rng = np.random.default_rng(seed)
    for name in rng.choice(names, 25):
        with cache.open({url!r} + "/" + name) as f:
            sys.stdout.write(name + " " + str(len(f.read())) + "\\n")
threads = [threading.Thread(target=work, args=(int(sys.argv[1]) * 10 + t,)) for t in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
"""
    watcher = _Watcher(folder / "objects")
    watcher.start()
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    peak = watcher.stop()
    assert [p.returncode for p in procs] == [0, 0]
    reads = [line.split() for out in outs for line in out.splitlines()]
    assert len(reads) == 2 * 4 * 25
    assert all(int(n) == len(payloads[name]) for name, n in reads)  # every read saw the whole object
    assert watcher.samples > 10
    assert 0 < peak <= bound, f"the cache folder reached {peak:,} bytes, over its bound of {bound:,}"
    assert _cache_bytes(folder / "objects") <= bound


def test_an_object_larger_than_the_bound_is_refused_by_name(s3, tmp_path):
    url, _ = s3
    fs, bucket = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{bucket}/big.bin", b"x" * 5000)
    with pytest.raises(Exception, match=r"big.bin is 5,000 bytes, more than the node cache's bound of 1,000"):
        NodeCache(tmp_path / "c", 1000).open(f"{url}/big.bin")


def test_the_reservation_of_a_download_killed_midway_is_reclaimed(s3, tmp_path, monkeypatch):
    """A process killed while downloading leaves its reservation and part file; the next download
    that needs the space takes them back (the dead process holds no lock on its reservation)."""
    url, env = s3
    fs, bucket = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{bucket}/small.bin", b"y" * 500)
    folder = tmp_path / "c"
    NodeCache(folder, 1000)
    ticket = folder / "reserved" / "x-big.bin.99999-1"  # named as a download's: ENTRY.PID-THREAD
    script = (
        "import pathlib, time\n"
        "from vpit.storage import _Reservation\n"
        f"_Reservation(pathlib.Path({str(ticket)!r}), 900)\n"
        "print('reserved', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "reserved"
    proc.kill()
    proc.wait()
    assert len(os.listdir(folder / "reserved")) == 1
    monkeypatch.setattr(storage, "WAIT_FOR_SPACE_S", 5.0)  # a live reservation would make it give up
    with NodeCache(folder, 1000).open(f"{url}/small.bin") as f:
        assert f.read() == b"y" * 500
    assert os.listdir(folder / "reserved") == []
