"""DeepSpeed wiring: process group, ZeRO-3 engine, sharded-parameter access, checkpoint reading.

Everything that imports DeepSpeed lives here, so model/ stays plain PyTorch. Precision
follows the device: bf16 on GPU, fp32 on CPU (whatever the JSON says), because CPU bf16
matmuls are slow and the CPU runs exist to be exact (resume tests compare to 1e-6).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from vpit.common import is_verbose, muted
from vpit.errors import ConfigError, InputError
from vpit.infra import config_file
from vpit.model.build import Sharding

__all__ = [
    "DistInfo",
    "all_reduce",
    "collective_device",
    "sharded_build",
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
        _refuse_worlds_of_one()
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


# Variables a multi-process launcher sets in each process it starts; torchrun and deepspeed
# also set RANK, which is what the trainer needs to join one world.
_LAUNCHERS = (
    ("SLURM_NTASKS", "srun"),
    ("OMPI_COMM_WORLD_SIZE", "mpirun"),
    ("PMI_SIZE", "an MPI launcher"),
    ("LOCAL_WORLD_SIZE", "a launcher"),
)


def _refuse_worlds_of_one() -> None:
    """Several processes started without a rendezvous would each train alone, on the same data."""
    for var, launcher in _LAUNCHERS:
        if int(os.environ.get(var, "1") or 1) > 1:
            raise ConfigError(
                f"{var}={os.environ[var]}: {launcher} started several processes but none of them was given RANK "
                "and WORLD_SIZE, so each would train as a world of one on the same data. Start the ranks with "
                "torchrun (e.g. `srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 ... -m vpit train ...`, "
                "see infra/slurm/train.sh) or `deepspeed --module vpit train ...`"
            )


def collective_device(engine: Any) -> torch.device:
    """Where a collective's tensors must live: the engine's device (NCCL serves only CUDA tensors)."""
    return torch.device(engine.device)


def all_reduce(values: list[float] | torch.Tensor, engine: Any, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a float64 vector over ranks. The tensor is moved to the engine's device first
    (a CPU tensor under NCCL fails with "No backend type associated with device type cpu"); the
    result stays there (.tolist() brings it back)."""
    t = torch.as_tensor(values, dtype=torch.float64).to(collective_device(engine))
    torch.distributed.all_reduce(
        t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    )
    return t


@contextlib.contextmanager
def sharded_build(config: dict[str, Any], dtype: torch.dtype) -> Iterator[Sharding]:
    """The means to build a model under ZeRO-3 so that no rank ever holds all of it: partitioning
    (zero.Init, a parameter at a time or new modules), writes into partitions, and transformers'
    own sharded creation (HfDeepSpeedConfig, alive only inside `transformers()`, so that a later
    plain load in the same process, export or evaluation, is not sharded)."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed = _deepspeed()
    if config.get("bf16", {}).get("enabled", False) != (dtype == torch.bfloat16):
        raise ConfigError(f"deepspeed: bf16.enabled must match the model dtype {dtype}")
    zero = config.get("zero_optimization", {})
    # The build partitions a parameter at a time (one zero.Init each): an NVMe swapper would be
    # made, and its folder emptied, per parameter, and hpZ's group may be made only once.
    if (zero.get("offload_param") or {}).get("device") == "nvme" or zero.get("zero_hpz_partition_size", 1) > 1:
        raise ConfigError(
            "deepspeed: zero_optimization.offload_param.device nvme and zero_hpz_partition_size > 1 are not "
            "supported by vpit's sharded build; offload parameters to cpu, or set zero_init: false"
        )

    @contextlib.contextmanager
    def transformers_zero3() -> Iterator[None]:
        keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 - transformers holds only a weak reference
        try:
            yield
        finally:
            unset_hf_deepspeed_config()

    # zero.Init is given no dtype: it then takes the config's (bf16 or fp32). Given one, DeepSpeed
    # 0.19 keeps it only where the accelerator reports fp16 support, and on a CPU without
    # mkldnn fp16 it silently makes bf16 partitions (an operator-precedence slip in _set_dtype).
    yield Sharding(
        new_modules=lambda: deepspeed.zero.Init(config_dict_or_path=config),
        gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0),
        partition=lambda module: deepspeed.zero.Init(module=module, config_dict_or_path=config),
        transformers=transformers_zero3,
        local_part=_local_part,
        device=torch.device(deepspeed.get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0")))),
    )


def _local_part(param: torch.nn.Parameter) -> tuple[torch.Tensor, int] | None:
    """This rank's slice of a ZeRO-3 parameter, flattened, and where it starts in the flattened
    whole (DeepSpeed cuts the flattened parameter into equal parts, the last one padded)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if not hasattr(param, "ds_id"):
        return None
    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE or param.ds_tensor.final_location is not None:
        raise RuntimeError(f"parameter {param.ds_id}: only a partition held in memory can be written in place")
    size = param.ds_tensor.ds_numel
    start = size * torch.distributed.get_rank(group=param.ds_process_group)
    return param.ds_tensor.narrow(0, 0, max(0, min(size, param.ds_numel - start))), start


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
    if cfg.get("checkpoint", {}).get("use_node_local_storage"):
        raise ConfigError(
            f"deepspeed: {path} sets checkpoint.use_node_local_storage, but vpit's checkpoints are one "
            "shared folder that every rank writes and any world size resumes from; remove it"
        )
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
