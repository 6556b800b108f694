"""Build a VPiT model from a config, and save/load the exported Hugging Face folder.

The LLM is either a tiny Llama built in code (tests, demo) or a local Hugging Face folder
(production: Llama-3.1-8B). An exported folder is a plain Hugging Face model folder (loads
with `AutoModelForCausalLM.from_pretrained`, safetensors) with the VPiT parts beside it:

    config.json, model.safetensors, tokenizer files   the LLM, vocabulary incl. image delimiters
    vpit.json                                         VPiTConfig (dims, delimiter ids, template)
    projector.safetensors, vision_head.safetensors    the two MLPs
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vpit.common import release_freed_memory
from vpit.config import path_field
from vpit.errors import ConfigError
from vpit.model.chat_template import get_template
from vpit.model.sharded_load import LocalPart, load_pretrained_sharded, write_rows, write_whole
from vpit.model.tokenizer import add_image_tokens, load_tokenizer
from vpit.model.vpit import VPiTConfig, VPiTModel, init_new_embeddings_to_mean, make_mlps, set_rows_to_mean

__all__ = [
    "ModelConfig",
    "Sharding",
    "build_model",
    "load_init_from",
    "load_exported",
    "save_exported",
    "tiny_llm_config",
]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    llm: str = path_field("tiny", keep=("tiny",))
    """`tiny` (a small Llama built in code) or a local Hugging Face model folder."""
    tokenizer: str | None = path_field(None, keep=("qwen2.5",))
    """`qwen2.5` (built in), or a local tokenizer folder; default: the LLM's folder (qwen2.5 for tiny)."""
    chat_template: str = "llama3"
    """Turn format: llama3 | chatml."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """Attention kernel, passed to transformers; packed samples stay apart under each (position-id
    resets: the block-diagonal mask for sdpa and eager, varlen kernels for flash_attention_2)."""
    init_from: str | None = path_field(None)
    """An exported VPiT folder (`vpit export`) whose projector, vision head and <image_start>/<image_end>
    embedding rows start this model: stage 2 from stage 1."""
    vision_dim: int = 1152
    """Width of a cached visual token; must match the token cache."""
    num_visual_tokens: int = 64
    """m, visual tokens per image; must match the token cache."""
    vision_coef: float = 1.0
    """Weight of the vision loss."""
    hidden_size: int = 64
    """tiny only: LLM width."""
    num_layers: int = 2
    """tiny only: decoder layers."""
    num_heads: int = 4
    """tiny only: attention heads."""
    intermediate_size: int = 128
    """tiny only: MLP width."""

    def __post_init__(self):
        get_template(self.chat_template)
        if self.llm != "tiny" and not Path(self.llm).is_dir():
            raise ConfigError(f"model.llm: expected 'tiny' or a local model folder, got {self.llm!r}")
        for name in ("vision_dim", "num_visual_tokens", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size: {self.hidden_size} is not a multiple of num_heads={self.num_heads}")


def tiny_llm_config(cfg: ModelConfig, vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        vocab_size=vocab_size,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attn_implementation=cfg.attn_implementation,
    )


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a sharded trainer has the model built (the trainer makes these; model/ imports no DeepSpeed).

    Args:
        new_modules: a context in which new modules are created already sharded (deepspeed.zero.Init).
        gather: a context that materialises sharded parameters for an edit by rank 0, then re-shards.
        partition: shards the plain parameters of an existing module (a parameter loaded whole; what
            transformers' resize leaves: under ZeRO-3 it makes the new embedding whole on every rank).
        transformers: a context in which transformers creates and loads models sharded itself
            (HfDeepSpeedConfig): tiny LLMs, checkpoints vpit's loader leaves to it, resizes.
        local_part: a partitioned parameter's slice on this rank (flattened) and its offset in the
            flattened whole, for writes that gather nothing; None for a plain parameter.
        device: where this rank's forward runs (the LLM's buffers go there).
    """

    new_modules: Callable[[], AbstractContextManager]
    gather: Callable[[list[nn.Parameter]], AbstractContextManager]
    partition: Callable[[nn.Module], None]
    transformers: Callable[[], AbstractContextManager]
    local_part: Callable[[nn.Parameter], tuple[torch.Tensor, int] | None]
    device: torch.device


def build_model(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, sharding: Sharding | None = None
) -> tuple[VPiTModel, Any]:
    """A VPiT model in train mode (tiny: random init from the current torch seed) and its tokenizer.

    With `sharding` (ZeRO-3) no rank holds the model whole: a pretrained LLM is read straight into
    partitions (model/sharded_load.py), other LLMs are made by transformers under zero.Init, and the
    two MLPs are created under `new_modules`.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg.tokenizer or ("qwen2.5" if cfg.llm == "tiny" else cfg.llm))
    n_old = len(tokenizer)
    start_id, end_id = add_image_tokens(tokenizer)
    new = [i for i in (start_id, end_id) if i >= n_old]
    kwargs = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    seed = torch.initial_seed()

    def set_new_rows(weight: torch.Tensor) -> None:
        if new:
            set_rows_to_mean(weight, new, n_old)

    llm = None
    if sharding and cfg.llm != "tiny":
        llm = load_pretrained_sharded(
            cfg.llm, kwargs, sharding.partition, sharding.device, len(tokenizer), n_old, set_new_rows
        )
        if llm is None:
            print(
                f"model.llm: {cfg.llm} is not a safetensors checkpoint named as the model's parameters; loading "
                "it through transformers, which gathers each module whole on every rank",
                file=sys.stderr,
            )
    if llm is None:
        with sharding.transformers() if sharding else nullcontext():
            if cfg.llm == "tiny":
                llm = AutoModelForCausalLM.from_config(tiny_llm_config(cfg, n_old), **kwargs)
            else:
                llm = AutoModelForCausalLM.from_pretrained(cfg.llm, **kwargs)
            release_freed_memory()  # the load's freed buffers, before the resize gathers the embedding
            if llm.get_input_embeddings().num_embeddings < len(tokenizer):
                llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
                if sharding:
                    sharding.partition(llm.get_input_embeddings())
                    if llm.get_output_embeddings() is not None:
                        sharding.partition(llm.get_output_embeddings())
                release_freed_memory()
        if new:
            init_new_embeddings_to_mean(llm, new, n_old, sharding.gather if sharding else None)
    # The MLPs' init depends on the seed alone, not on how much randomness the LLM's load drew.
    torch.manual_seed((seed + 1) % 2**63)
    vcfg = VPiTConfig(
        vision_dim=cfg.vision_dim,
        num_visual_tokens=cfg.num_visual_tokens,
        image_start_id=start_id,
        image_end_id=end_id,
        vision_coef=cfg.vision_coef,
        chat_template=cfg.chat_template,
    )
    with sharding.new_modules() if sharding else nullcontext():
        mlps = make_mlps(vcfg, llm.config.hidden_size, dtype)
    model = VPiTModel(llm, vcfg, *mlps)
    if cfg.init_from:
        load_init_from(model, cfg.init_from, sharding.local_part if sharding else None)
    # from_pretrained returns the LLM in eval mode, where HF's gradient checkpointing never
    # recomputes and dropout is off: a trainer wants train mode.
    return model.train(), tokenizer


def load_init_from(model: VPiTModel, folder: str | Path, local_part: LocalPart | None = None) -> None:
    """Start `model`'s projector, vision head and image-delimiter embedding rows from an exported
    folder (a sharded model's parameters are written in their partitions, nothing gathered)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "vpit.json").is_file():
        raise ConfigError(
            f"model.init_from: {folder} is not an exported VPiT folder (no vpit.json); "
            "run `vpit export` on the stage-1 run first"
        )
    theirs, ours = VPiTConfig.load(folder / "vpit.json"), model.config
    for key in ("vision_dim", "num_visual_tokens", "image_start_id", "image_end_id"):
        if getattr(theirs, key) != getattr(ours, key):
            raise ConfigError(
                f"model.init_from: {folder} has {key}={getattr(theirs, key)}, this model "
                f"{getattr(ours, key)}; use the same tokenizer, cache and dims as the run exported"
            )
    ids = [ours.image_start_id, ours.image_end_id]
    embed = model.llm.get_input_embeddings().weight
    out = model.llm.get_output_embeddings()
    rows = {"model.embed_tokens.weight": embed}
    if out is not None and out.weight is not embed:
        rows["lm_head.weight"] = out.weight
    what = ""
    try:
        for name in ("projector", "vision_head"):
            module = getattr(model, name)
            for key, value in load_file(str(folder / f"{name}.safetensors")).items():
                what = f"{name}.safetensors: {key}"
                write_whole(module.get_parameter(key), value, local_part)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            for key, weight in rows.items():
                if key in f.keys():
                    what = f"model.safetensors: {key}"
                    write_rows(weight, ids, torch.cat([f.get_slice(key)[i : i + 1] for i in ids]), local_part)
    except ValueError as e:  # another LLM's widths
        raise ConfigError(
            f"model.init_from: {folder}/{what}: {e}; was it exported from another LLM? init_from needs this run's LLM"
        ) from None


def save_exported(model: VPiTModel, tokenizer: Any, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.config.save(out / "vpit.json")
    for name in ("projector", "vision_head"):
        sd = {k: v.detach().contiguous().cpu() for k, v in getattr(model, name).state_dict().items()}
        save_file(sd, str(out / f"{name}.safetensors"))
    return out


def load_exported(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[VPiTModel, Any]:
    """Load an exported folder (see module docstring) as a VPiTModel and its tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "vpit.json").is_file():
        raise ConfigError(f"{folder}: not an exported VPiT folder (no vpit.json); run `vpit export` first")
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model = VPiTModel(llm, VPiTConfig.load(folder / "vpit.json"))
    for name in ("projector", "vision_head"):
        getattr(model, name).load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    return model.to(dtype).eval(), AutoTokenizer.from_pretrained(folder)
