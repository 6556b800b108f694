"""`vpit export`: a training checkpoint -> a Hugging Face folder (model/build.py's layout).

The ZeRO-3 shards of every rank are merged into one fp32 state dict by DeepSpeed's
zero_to_fp32 reader (no process group needed), cast (bf16 by default) and assigned into a
skeleton of the model built on the meta device from the run's saved LLM config (so no random
full-size init happens first), and written with `save_pretrained` (safetensors). The result loads with
plain `AutoModelForCausalLM.from_pretrained`; the projector, vision head and VPiT config
lie beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vpit.errors import ConfigError
from vpit.model.build import load_exported, save_exported
from vpit.model.vpit import VPiTConfig, VPiTModel
from vpit.train.checkpoint import latest_checkpoint
from vpit.train.parallelize import read_zero3_state_dict

__all__ = ["export_checkpoint", "load_checkpoint_model", "resolve_checkpoint"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (-> its latest complete checkpoint) or a checkpoint folder."""
    path = Path(path)
    if (path / "vpit_state.json").is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"{path}: neither a checkpoint folder nor a run folder with a complete checkpoint")
    return ckpt


def load_checkpoint_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> tuple[VPiTModel, Any]:
    """Rebuild the full model of a ZeRO-3 checkpoint on one process, in `dtype`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = resolve_checkpoint(checkpoint)
    model_dir = ckpt.parent.parent / "model"
    if not (model_dir / "vpit.json").is_file():
        raise ConfigError(f"{model_dir}: missing; it is written by `vpit train` at the start of a run")
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
        model = VPiTModel(llm, VPiTConfig.load(model_dir / "vpit.json"))
    state = read_zero3_state_dict(ckpt.parent, ckpt.name)
    for key in list(state):  # cast one tensor at a time: the fp32 copy of each goes at once
        state[key] = state.pop(key).to(dtype)
    tied = {"llm.lm_head.weight"} if llm.config.tie_word_embeddings else set()
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state) - tied, set(state) - expected
    if missing or unexpected:
        raise ConfigError(
            f"{ckpt}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(state, strict=False, assign=True)
    llm.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an exported folder, bf16 by default (what the weights are trained in on GPU)."""
    model, tokenizer = load_checkpoint_model(checkpoint, dtype)
    return save_exported(model, tokenizer, out)


def load_any(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[VPiTModel, Any]:
    """An exported folder, a run folder or a checkpoint folder."""
    if (Path(path) / "vpit.json").is_file():
        return load_exported(path, dtype)
    return load_checkpoint_model(path, dtype)
