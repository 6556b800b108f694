"""DeepSpeed wiring: process group, ZeRO-3 engine, sharded-parameter access, checkpoint reading.

Everything that imports DeepSpeed lives here, so model/ stays plain PyTorch. Precision
follows the device: bf16 on GPU, fp32 on CPU (whatever the JSON says), because CPU bf16
matmuls are slow and the CPU runs exist to be exact (resume tests compare to 1e-6).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from vpit.common import is_verbose, muted
from vpit.errors import ConfigError, InputError
from vpit.infra import config_file

__all__ = [
    "DistInfo",
    "barrier",
    "ds_config",
    "gather_for_update",
    "init_distributed",
    "initialize",
    "read_zero3_state_dict",
]


class DistInfo:
    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def _deepspeed():
    """DeepSpeed, imported quietly: its import announces the accelerator and builds a comm op."""
    import logging

    with muted():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        get_accelerator()
    if not is_verbose():  # DeepSpeed's logger resets its own level when first imported
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def init_distributed() -> DistInfo:
    """Join the process group that `deepspeed`/`torchrun` set up, or make a world of one."""
    deepspeed = _deepspeed()

    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    if "RANK" not in os.environ:  # run directly: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        # Rendezvous through a private file, not a TCP port: a "free" port picked here can be
        # taken by another process (Ray, a parallel grid cell) before the store binds it.
        fd, path = tempfile.mkstemp(prefix="vpit-rendezvous-")
        os.close(fd)
        os.unlink(path)
        kwargs = {"init_method": f"file://{path}", "rank": 0, "world_size": 1}
    if not torch.distributed.is_initialized():
        with muted():  # the first init on a machine compiles DeepSpeed's shared-memory comm op
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False, **kwargs)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)


def barrier() -> None:
    torch.distributed.barrier()


def ds_config(
    path: str | None, *, on_gpu: bool, micro_batch_size: int, grad_accum: int, world_size: int, grad_clip: float
) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill in what the training config decides."""
    path = Path(path) if path else config_file("deepspeed", "zero3_gpu_bf16.json" if on_gpu else "zero3_cpu.json")
    if not path.is_file():
        raise InputError(f"deepspeed: config {path} does not exist")
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    if cfg.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(f"deepspeed: {path} must set zero_optimization.stage to 3")
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        train_batch_size=micro_batch_size * grad_accum * world_size,
        gradient_clipping=grad_clip,
    )
    cfg["bf16"] = {"enabled": on_gpu}
    cfg["fp16"] = {"enabled": False}
    if not on_gpu:
        cfg.get("checkpoint", {}).pop("use_node_local_storage", None)
    return cfg


def initialize(
    model: torch.nn.Module,
    config: dict[str, Any],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    schedule: Callable[[int], float],
) -> Any:
    """The ZeRO-3 engine, with torch AdamW over the trainable parameters (unless the JSON names
    its own optimizer, as CPU-offload configs do) and a LambdaLR schedule."""
    deepspeed = _deepspeed()

    params = [p for p in model.parameters() if p.requires_grad]
    if "optimizer" in config:
        config["optimizer"].setdefault("params", {}).update(lr=lr, betas=list(betas), weight_decay=weight_decay)
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
        config["zero_allow_untested_optimizer"] = True  # DeepSpeed's allow-list check for client optimizers
    with muted():  # op-builder probes (a linker looking for libaio), config dumps
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=params if optimizer is None else None,
            config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
    return engine


def gather_for_update(params: list[torch.nn.Parameter]) -> AbstractContextManager:
    """Materialise ZeRO-3 sharded parameters on rank 0 for an in-place edit, then re-shard."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def read_zero3_state_dict(checkpoint_root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO-3 checkpoint, merged from every rank's shards,
    without a process group (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with muted():  # it prints every step of the merge
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root), tag=tag)
