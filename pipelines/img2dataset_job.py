"""Run `img2dataset.download` in a process of its own:
`python -m vpit.pipelines.img2dataset_job KWARGS_JSON PARENT_PID`.

img2dataset starts its pool and its logger with the "spawn" start method, which re-imports the
`__main__` module in every child: called from a module without a main guard (a notebook cell,
`python -c`, a Ray worker) it hangs instead of failing. This module is the only place we call
it, it has the guard, and `vpit.pipelines.pairs` runs it as a subprocess with a time limit.

The job runs in its own session (process group). A watchdog thread kills the whole group if
the parent dies (even by SIGKILL, which the parent cannot forward), so no downloader outlives
the `vpit` command that started it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

__all__ = ["main"]


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:  # re-parented: the vpit process is gone
            os.killpg(os.getpgid(0), signal.SIGKILL)
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m vpit.pipelines.img2dataset_job KWARGS_JSON PARENT_PID", file=sys.stderr)
        return 2
    kwargs = json.loads(argv[0])
    threading.Thread(target=_watch_parent, args=(int(argv[1]),), daemon=True).start()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home
    if kwargs.get("distributor") == "ray":  # join the cluster vpit runs on (RAY_ADDRESS, set by the parent)
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    from img2dataset import download

    download(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
