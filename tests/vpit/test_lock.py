"""One writer per output folder: a second one stops at once naming the first; a dead one's lock
is taken over, on this host by its pid, from another host by its stale heartbeat."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from vpit.lock import LOCK_NAME, FolderLock, LockedError


def test_a_second_writer_stops_at_once_naming_the_first(tmp_path):
    with FolderLock(tmp_path / "out", "vpit ingest llava"):
        held = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert held["host"] == socket.gethostname()
        # another process (a second `vpit ingest`) meets a live holder
        code = (
            "import sys; from vpit.lock import FolderLock, LockedError\n"
            "try:\n    FolderLock(sys.argv[1], 'vpit ingest llava').acquire()\n"
            "except LockedError as e:\n    print(e); sys.exit(3)\n"
        )
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
        assert res.returncode == 3
        assert res.stdout.startswith(
            f"another vpit ingest llava is writing {tmp_path / 'out'} (pid {held['pid']} on host {held['host']}, since "
        )
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(
        json.dumps(
            {"host": socket.gethostname(), "pid": pid, "command": "vpit ingest", "since": 1, "heartbeat": time.time()}
        )
    )
    with FolderLock(tmp_path, "vpit precompute"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "vpit precompute"


def test_another_hosts_lock_expires_only_when_its_heartbeat_stops(tmp_path):
    other = {"host": "node-17", "pid": 1, "command": "vpit train", "since": 1}
    (tmp_path / LOCK_NAME).write_text(json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(LockedError, match="pid 1 on host node-17"):  # alive as far as we can tell
        FolderLock(tmp_path, "vpit train", stale_s=60).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**other, "heartbeat": time.time() - 120}))
    with FolderLock(tmp_path, "vpit train", stale_s=60):  # gone: its heartbeat stopped two minutes ago
        assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == socket.gethostname()


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path):
    with FolderLock(tmp_path, "vpit grid run", refresh_s=0.05):
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first


def test_two_ingests_into_one_folder_one_completes_the_other_says_why(tmp_path, ray_local):
    """Was: one of them died with a raw Ray UserCodeException (tarfile.ReadError)."""
    from vpit.common import vpit_argv
    from vpit.demo.corpora import write_llava_dataset
    from vpit.pipelines.shards import Dataset

    info = write_llava_dataset(tmp_path / "raw", 300, seed=3)
    cmd = vpit_argv(
        "ingest",
        "llava",
        str(info["jsonl"]),
        "--image-root",
        str(tmp_path / "raw"),
        "-o",
        str(tmp_path / "ds"),
        "--shard-size",
        "10",
        "--workers",
        "1",
    )
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "ds" / LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "another vpit ingest llava is writing" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    ids = [s.record["origin"]["record_id"] for s in Dataset(tmp_path / "ds")]
    assert sorted(ids) == sorted(info["ids"])
