"""Helpers every stage shares: quiet third-party output, start Ray, write JSON atomically,
plot headless, launch `python -m vpit` in a clean environment.

Kept in one small module so that no stage imports another stage just for a helper.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "DIST_ENV",
    "init_ray",
    "ray_gcs_address",
    "user_error_in",
    "muted",
    "pyplot",
    "quiet",
    "save_json_atomic",
    "subprocess_env",
    "text_table",
    "vpit_argv",
]

# Third-party libraries that phone home at import; vpit is offline by design.
for _key, _value in (
    ("NO_ALBUMENTATIONS_UPDATE", "1"),
    ("HF_HUB_OFFLINE", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_key, _value)

# The rendezvous variables a launcher (torchrun, deepspeed) sets for its children.
DIST_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)

# Warnings about other libraries' internals that a vpit user can do nothing about. Each is a
# regex of the message; the rest stays visible. `--verbose` (VPIT_VERBOSE=1) shows them all.
_NOISE = (
    r"`torch\.distributed\.\w+` is deprecated",  # DeepSpeed 0.19 calls collectives torch 2.13 renamed
    r"`Transformer2DModelOutput` is deprecated",  # diffusers' own import of its old name
    r"The `srun` command is available",  # Ray, on a SLURM login node
)


def quiet(on: bool = True) -> None:
    """Silence the known third-party noise (on), or let everything through (off, `--verbose`).

    The environment variable carries the choice into the subprocesses vpit starts (grid
    cells, img2dataset, Ray workers)."""
    os.environ["VPIT_VERBOSE"] = "0" if on else "1"
    if not on:
        warnings.resetwarnings()
        return
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # Ray's new-cluster notice ("Token authentication is enabled...") comes on every local start.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("DeepSpeed", "deepspeed", "ray", "ray.data", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def muted():
    """Hold back what third-party code prints, C-level output included (DeepSpeed's op builds,
    its checkpoint-merge chatter), unless verbose; on an exception the held-back text is shown."""
    if is_verbose():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore(saved)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        else:
            _restore(saved)


def _restore(saved: list[int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)
    saved.clear()


def is_verbose() -> bool:
    return os.environ.get("VPIT_VERBOSE") == "1"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address` or RAY_ADDRESS), or start a local one, quietly."""
    import ray

    if not ray.is_initialized():
        import signal
        import threading

        from vpit.errors import Terminated

        main_thread = threading.current_thread() is threading.main_thread()
        term = signal.getsignal(signal.SIGTERM) if main_thread else None
        # A SIGTERM must end a command with one line: `vpit` turns Ray's C++ failure handler off
        # before importing ray (vpit.cli), our handler is put back after ray.init, and during it
        # Ray's own Python handler turns SIGTERM into sys.exit(15), caught here.
        try:
            ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=is_verbose(),
                logging_level=logging.WARNING,
            )
        except SystemExit as e:
            if e.code == signal.SIGTERM and callable(term):
                raise Terminated() from None
            raise
        finally:
            if main_thread and callable(term):
                signal.signal(signal.SIGTERM, term)
    # Our own tqdm bars report progress; Ray Data's per-operator logging would bury them.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # A worker's exception reaches the driver as itself (an OSError, a VpitError), not as Ray Data's
    # UserCodeException, whose cause does not survive pickling: the CLI can then say it in one line.
    ctx.raise_original_map_exception = True
    # A failed task is logged by Ray Data with its traceback before it reaches us; we say it in one line.
    logging.getLogger("ray.data").setLevel(logging.WARNING if is_verbose() else logging.CRITICAL)


def user_error_in(exc: BaseException) -> BaseException | None:
    """The VpitError inside an exception a Ray task raised (Ray wraps it, sometimes twice), or None:
    a user mistake found in a worker then reads as one line, as it would on the driver."""
    from vpit.errors import VpitError

    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, VpitError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def ray_gcs_address() -> str:
    """The address of the Ray cluster this process is connected to, for a subprocess to join it."""
    import ray

    return ray.get_runtime_context().gcs_address


def cluster_cpus() -> int:
    """CPUs of the Ray cluster when one is up or named by RAY_ADDRESS, else of this machine."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def save_json_atomic(path: Path, obj: Any, *, indent: int | None = 1) -> None:
    """Write JSON so that readers only ever see the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (vpit only ever writes PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# torchrun passes these on to its ranks (the trainer checkpoints and exits 0 on SIGTERM/SIGUSR1)
# and gives them this long to finish before SIGKILL; its defaults are no SIGUSR1 and 30 s.
TORCHRUN_SIGNALS = ("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=900")


def vpit_argv(*args: str, nproc: int = 1) -> list[str]:
    """The command line that runs `vpit ARGS` with this Python: `python -m vpit`, under torchrun
    (--standalone: the store binds its own port, so no race for a free one) when nproc > 1.
    Run it with `subprocess_env()`, so that a folder in the working directory cannot shadow a module."""
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *TORCHRUN_SIGNALS,
            "-m",
            "vpit",
            *args,
        ]
    return [sys.executable, "-m", "vpit", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a `python -m vpit...` child: no rendezvous inherited from a trainer that
    ran in this process (it leaves RANK/WORLD_SIZE behind for DeepSpeed), and PYTHONSAFEPATH, so
    neither it nor its own children (torchrun's ranks) put the working directory on sys.path,
    where a user's `pipelines/` or `train/` folder could shadow a module."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONSAFEPATH="1", **extra)
    return env


def text_table(head: tuple, rows: list[tuple], left: int = 1) -> list[str]:
    """Lines of a text table sized to its widest cell: the first `left` columns left-aligned,
    the rest (numbers) right-aligned, a rule under the header."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r: tuple) -> str:
        return "  " + "  ".join(
            str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return [line(head), "  " + "-" * (sum(widths) + 2 * len(widths) - 2), *map(line, rows)]


def disk_full(path: str | Path) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has under 1 MiB free:
    the likely cause when a write fails with an error that is not itself ENOSPC."""
    import shutil

    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free < 2**20
    except OSError:
        return False


def raise_if_disk_full(path: str | Path) -> None:
    """Raise ENOSPC naming `path` when its disk is full (the CLI says it in one line)."""
    import errno

    if disk_full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Loading a model frees many tensors of a few MB each; glibc serves those from its heap and keeps
    the freed pages, so a process holds GBs it no longer uses. Measured (a probe, world 2) on the
    sharded load of bench/rehearsal.py's 0.54B LLM: 2.1-2.5 GB held per rank after from_pretrained,
    1.65 GB after a trim, and the next step's peak (the embedding resize) 0.9 GB lower."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
