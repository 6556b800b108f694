"""One writer per output folder: a lock file that names its holder and is kept fresh.

`FolderLock(folder, command)` creates `FOLDER/.vpit-lock` exclusively (O_CREAT | O_EXCL, which
NFS v3+ and object-store FUSE mounts honour for plain files) holding the writer's host, pid,
command and start time, and a thread rewrites its `heartbeat` every `refresh_s` while the
writer lives. A second writer finds the file and stops at once with one line naming the
holder. A lock whose writer is gone is taken over: on the same host, when its pid no longer
runs; from any host, when its heartbeat is older than `stale_s` (a writer on another machine
cannot be asked whether it lives, but it cannot stop refreshing without dying or hanging).
Taking over is itself a rename of a fresh file over the stale one, checked afterwards, so two
processes that both see a stale lock cannot both win.

Our own ~100 lines rather than fcntl/flock: advisory locks do not cross NFS clients reliably
and do not say who holds them; `filelock` neither names the holder nor expires a dead one.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from vpit.errors import VpitError

__all__ = ["FolderLock", "LockedError", "LOCK_NAME"]

LOCK_NAME = ".vpit-lock"
_HELD: dict[Path, int] = {}  # folders this process holds, and how many nested holders it has


class LockedError(VpitError):
    """Another live writer holds the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class FolderLock:
    """Hold `folder` for one writer for the duration of a `with` block (see the module docstring).

    Args:
        folder: the output folder (created if missing).
        command: what the writer is, for the message a second writer sees (e.g. "vpit ingest").
        refresh_s: how often the heartbeat is rewritten.
        stale_s: a heartbeat this old means the writer is gone, whatever host it ran on.
    """

    def __init__(self, folder: str | Path, command: str, refresh_s: float = 10.0, stale_s: float = 120.0):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command, self.refresh_s, self.stale_s = command, refresh_s, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: dict[str, Any] = {}

    # -- the file --------------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": self.command,
            "since": self.info.get("since", now),
            "heartbeat": now,
            "token": self.info.get("token") or f"{socket.gethostname()}:{os.getpid()}:{now}",
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or garbage: treated as stale below

    def _stale(self, held: dict[str, Any]) -> bool:
        if not held or "heartbeat" not in held:
            return True
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1))):
            return True
        return time.time() - float(held["heartbeat"]) > self.stale_s

    def _write(self, info: dict[str, Any], exclusive: bool) -> bool:
        data = (json.dumps(info) + "\n").encode()
        if exclusive:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        return True

    # -- acquire / release -----------------------------------------------------------------
    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:  # this process holds it already (ingest pairs, then its ingest): nest
            _HELD[key] += 1
            self._nested = True
            return self
        self._nested = False
        self.info = self._payload()
        if not self._write(self.info, exclusive=True):
            held = self._read()
            if held is not None and not self._stale(held):
                raise LockedError(self._message(held))
            self._write(self.info, exclusive=False)  # take over the dead writer's lock
            time.sleep(0.05)
            if (self._read() or {}).get("token") != self.info["token"]:  # another taker won
                raise LockedError(self._message(self._read() or {}))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="vpit-lock")
        self._thread.start()
        _HELD[key] = 1
        return self

    def _message(self, held: dict[str, Any]) -> str:
        since = held.get("since")
        when = datetime.datetime.fromtimestamp(since).isoformat(timespec="seconds") if since else "an unknown time"
        return (
            f"another {held.get('command', 'vpit command')} is writing {self.folder} (pid {held.get('pid', '?')} on "
            f"host {held.get('host', '?')}, since {when}); wait for it to finish, or, if it is gone, delete "
            f"{self.path}"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            held = self._read()
            if held is not None and held.get("token") != self.info["token"]:
                return  # taken over (we were presumed dead): never overwrite the new holder
            try:
                self._write({**self.info, "heartbeat": time.time()}, exclusive=False)
            except OSError:
                pass  # a full or read-only disk: the writer itself will fail louder

    def release(self) -> None:
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key] -= 1
            if _HELD[key]:
                return
            del _HELD[key]
        if getattr(self, "_nested", False):
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held is not None and held.get("token") == self.info.get("token"):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
