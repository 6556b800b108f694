"""The machine's faults reach the user as one line, never as a traceback: SIGTERM (a scheduler's
pre-emption), a full disk, a read-only output. A re-run then completes with every record once."""

from __future__ import annotations

import contextlib
import errno
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from vpit.cli import describe_environment_error, environment_error_in
from vpit.common import subprocess_env, vpit_argv
from vpit.demo.corpora import write_llava_dataset
from vpit.pipelines.shards import Dataset


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    info = write_llava_dataset(root / "raw", 240, seed=3)
    return root, info


def _ingest_cmd(root: Path, out: Path) -> list[str]:
    raw = root / "raw"
    return vpit_argv("ingest", "llava", str(raw / "data.jsonl"), "--image-root", str(raw), "-o", str(out),
                     "--shard-size", "8", "--workers", "2")  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _vpit_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("vpit ")]


def _ids(out: Path) -> Counter:
    return Counter(s.record["origin"]["record_id"] for s in Dataset(out))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {res.stderr.decode().strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_sigterm_ends_ingest_with_one_line_and_a_rerun_completes(corpus, tmp_path):
    root, info = corpus
    out = tmp_path / "out"
    proc = subprocess.Popen(_ingest_cmd(root, out), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "shards").glob("*.tar")):  # mid-job: shards appear
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = _vpit_lines(err)
    if proc.returncode == 0:  # it finished before the signal landed: still no traceback
        assert "Traceback" not in err
    else:
        assert proc.returncode == 143, err[-3000:]
        assert "Traceback" not in err and len(lines) == 1 and "terminated (SIGTERM)" in lines[0], err[-3000:]
        assert "re-run the same command" in lines[0]
    again = _run(_ingest_cmd(root, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _ids(out) == Counter(info["ids"])  # none lost, none twice


@pytest.mark.parametrize("read_only", [False, True], ids=["disk-full", "read-only"])
def test_a_full_or_read_only_output_is_one_line_naming_it(corpus, tmp_path, read_only):
    root, info = corpus
    out = tmp_path / "out"
    with _tmpfs(out, "128k", read_only=read_only):
        res = _run(_ingest_cmd(root, out))
    assert res.returncode == 2, res.stderr[-3000:]
    lines = _vpit_lines(res.stderr)
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-3000:]
    what = "Read-only file system" if read_only else "No space left on device"
    assert what in lines[0] and str(out) in lines[0] and "re-run" in lines[0], lines[0]
    again = _run(_ingest_cmd(root, out))  # the same folder, now on the real disk
    assert again.returncode == 0, again.stderr[-3000:]
    assert _ids(out) == Counter(info["ids"])


def test_environment_errors_are_found_inside_wrapped_exceptions():
    """Ray re-raises a task's OSError with its own message where the file name was: that text is
    not shown as a path; the command's output folder is named instead."""
    inner = OSError(errno.ENOSPC, "No space left on device", "Failed to apply UDF transform\nTo change retry")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as outer:
        found = environment_error_in(outer)
    assert found is inner
    line = describe_environment_error(found, "/data/out")
    assert line.startswith("No space left on device writing /data/out;") and "\n" not in line
    assert environment_error_in(ValueError("a bug")) is None
    assert environment_error_in(OSError(errno.ENOENT, "missing")) is None  # not the machine's state
