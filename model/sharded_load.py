"""Load a pretrained LLM straight into ZeRO-3 partitions, and write into partitioned parameters.

Written here rather than taken from transformers: its ZeRO-3 load (`from_pretrained` while an
HfDeepSpeedConfig lives) creates every module under zero.Init, then gathers each module whole on
every rank to initialise it and again to copy the checkpoint in, and a resize for new tokens
gathers the embedding once more. On bench/rehearsal.py's 0.54B LLM at world 2 that build peaked at
3.2 GB per rank, above a plain fp32 load's 2.9 GB: the tied embedding is 29% of that model.

Here the LLM is made on the meta device, and each parameter in turn is read from the
safetensors, given its new rows (the image delimiters) while it is whole, and handed to
DeepSpeed, which keeps this rank's partition. Beyond its partitions a rank holds at most one
parameter whole. Checkpoints whose names are not the model's (key renames, fused weights, other
formats) are left to transformers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpit.common import release_freed_memory
from vpit.errors import ConfigError

__all__ = ["full_shape", "load_pretrained_sharded", "write_rows", "write_whole"]

_CHUNK = 1 << 24  # elements read per slice: bounds the dtype conversion's temporary


def _checkpoint_files(folder: Path) -> dict[str, Path] | None:
    """{tensor name: safetensors file} of a Hugging Face folder; None when it has no safetensors."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_pretrained_sharded(
    folder: str | Path,
    kwargs: dict[str, Any],
    partition: Callable[[nn.Module], None],
    device: torch.device,
    num_rows: int,
    first_new_row: int,
    set_new_rows: Callable[[torch.Tensor], None],
) -> nn.Module | None:
    """The LLM of `folder` (AutoModelForCausalLM, `kwargs` as for from_pretrained) with every
    parameter partitioned by `partition` and its buffers on `device`. Its embedding matrices are
    grown to `num_rows` rows (those from `first_new_row` on are new tokens), and `set_new_rows`
    is applied to each while it is whole. None when the checkpoint's tensor names are not exactly
    the model's parameters, or its vocabulary is smaller than the tokenizer's (the caller then
    loads through transformers)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    files = _checkpoint_files(folder)
    if files is None:
        return None
    config = AutoConfig.from_pretrained(folder)
    saved_rows = config.vocab_size
    if saved_rows < first_new_row:  # rows between would be random, as a resize makes them
        return None
    config.vocab_size = max(saved_rows, num_rows)
    with init_empty_weights(include_buffers=False):  # buffers (RoPE frequencies) are computed, not loaded
        llm = AutoModelForCausalLM.from_config(config, **kwargs)
    llm.tie_weights()
    if llm.get_input_embeddings().num_embeddings < num_rows:  # an embedding not sized by vocab_size
        return None
    embeddings = {id(llm.get_input_embeddings().weight)}
    if llm.get_output_embeddings() is not None:
        embeddings.add(id(llm.get_output_embeddings().weight))

    owners: dict[int, list[str]] = {}  # a tied parameter has several names; any one may be saved
    for name, param in llm.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    buffers = {name for name, _ in llm.named_buffers()} - _non_persistent_buffers(llm)
    params = dict(llm.named_parameters())
    saved = {}
    for name, param in params.items():
        found = [n for n in owners[id(param)] if n in files]
        if not found:
            return None
        saved[name] = found[0]
    used = {n for names in owners.values() for n in names} | buffers
    if set(files) - used:
        return None

    with contextlib.ExitStack() as stack:
        opened = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(files.values())}
        for name, param in params.items():
            key = saved[name]
            whole = torch.empty(param.shape, dtype=param.dtype)
            if id(param) in embeddings:
                _read(opened[files[key]], key, whole[:saved_rows])
                whole[saved_rows:] = 0  # all new tokens' rows: set_new_rows sets them
                set_new_rows(whole)
            else:
                _read(opened[files[key]], key, whole)
            new = nn.Parameter(whole, requires_grad=param.requires_grad)
            for owner in owners[id(param)]:
                module, _, attr = owner.rpartition(".")
                setattr(llm.get_submodule(module), attr, new)
            holder = nn.Module()
            holder.register_parameter("weight", new)
            partition(holder)  # DeepSpeed keeps this rank's slice and frees the whole
            del whole, new, holder
            # glibc keeps the freed wholes in its heap, between the partitions made since: 0.43 GB
            # per rank at the end of the rehearsal's load (bench/rehearsal.py) without this
            release_freed_memory()
        for name in buffers & set(files):
            _read(opened[files[name]], name, llm.get_buffer(name))
    # DeepSpeed moves no module once its parameters are partitioned: the buffers go where the
    # forward runs (zero.Init would have made them there).
    for module in llm.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    if (folder / "generation_config.json").is_file():
        llm.generation_config = GenerationConfig.from_pretrained(folder)
    return llm


def _non_persistent_buffers(module: nn.Module) -> set[str]:
    return {
        f"{prefix}.{b}" if prefix else b for prefix, m in module.named_modules() for b in m._non_persistent_buffers_set
    }


def _read(f: Any, key: str, out: torch.Tensor) -> None:
    """Copy tensor `key` of an open safetensors file into `out` (casting), a slice at a time."""
    piece = f.get_slice(key)
    shape = list(piece.get_shape())
    if shape != list(out.shape):
        raise ConfigError(f"model.llm: checkpoint tensor {key} has shape {shape}, the model {list(out.shape)}")
    with torch.no_grad():
        if out.dim() < 2:
            out.copy_(f.get_tensor(key))
            return
        step = max(1, _CHUNK // out[0].numel())
        for a in range(0, shape[0], step):
            b = min(a + step, shape[0])
            out[a:b].copy_(piece[a:b])


LocalPart = Callable[[nn.Parameter], "tuple[torch.Tensor, int] | None"]


def full_shape(param: nn.Parameter) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its own shape is then [0])."""
    return getattr(param, "ds_shape", None) or param.shape


def write_whole(param: nn.Parameter, value: torch.Tensor, local_part: LocalPart | None) -> None:
    """param := value, into this rank's partition only when the parameter is partitioned."""
    if value.shape != full_shape(param):
        raise ValueError(f"shape {list(value.shape)} into a parameter of shape {list(full_shape(param))}")
    part = local_part(param) if local_part else None
    with torch.no_grad():
        if part is None:
            param.copy_(value)
        else:
            flat, start = part
            flat.copy_(value.reshape(-1)[start : start + flat.numel()])


def write_rows(param: nn.Parameter, ids: list[int], rows: torch.Tensor, local_part: LocalPart | None) -> None:
    """param[ids] := rows for a 2-D parameter, into this rank's partition when it is partitioned."""
    shape = full_shape(param)
    if rows.shape != (len(ids), shape[1]) or max(ids) >= shape[0]:
        raise ValueError(f"rows {ids} of width {rows.shape[1]} into a parameter of shape {list(shape)}")
    part = local_part(param) if local_part else None
    with torch.no_grad():
        if part is None:
            param[ids] = rows.to(param.dtype)
            return
        flat, start = part
        width = shape[1]
        for i, row in zip(ids, rows, strict=True):
            lo, hi = max(i * width, start), min((i + 1) * width, start + flat.numel())
            if lo < hi:
                flat[lo - start : hi - start] = row[lo - i * width : hi - i * width]
