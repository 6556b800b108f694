"""The training config: typed frozen dataclasses, loaded from YAML with strict checks.

Our own ~40-line YAML -> dataclass reader instead of a schema library: it only needs
nested dataclasses of plain types, and it must name the full key path of a bad value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from model.build import ModelConfig

__all__ = ["DataConfig", "TrainConfig", "from_dict", "load_train_config"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    mixture: str | None = None
    """Mixture spec YAML (relative to the training config's folder)."""
    mixture_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dotted overrides applied to the spec (e.g. groups.generation.count: 200k)."""
    synthetic: int = 0
    """Instead of a mixture: this many in-memory shapes-world items (smoke tests, GPU checks)."""
    max_len: int = 1024
    """Tokens per packed row."""
    overflow: Literal["truncate", "drop"] = "truncate"
    """A sample over max_len: cut before a visual block (truncate) or skip it (drop); both counted."""
    num_workers: int = 1
    """DataLoader worker processes per rank (the sample sequence does not depend on it)."""

    def __post_init__(self):
        if (self.mixture is None) == (self.synthetic == 0):
            raise ValueError("data: give exactly one of data.mixture (a spec path) or data.synthetic (an item count)")
        if self.max_len < 8:
            raise ValueError(f"data.max_len: expected >= 8, got {self.max_len}")
        if self.num_workers < 0 or self.synthetic < 0:
            raise ValueError("data.num_workers and data.synthetic: expected >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    output_dir: str
    """Run folder: checkpoints, metrics.jsonl, loss.png, the exported model's parts."""
    model: ModelConfig
    """The VPiT model (model/build.py)."""
    data: DataConfig
    """Where samples come from and how they are packed."""
    micro_batch_size: int = 4
    """Samples per rank per micro step (packed into rows of data.max_len)."""
    grad_accum: int = 1
    """Micro steps per optimizer step. Global batch = micro_batch_size x world size x grad_accum."""
    max_steps: int = 100
    """Optimizer steps."""
    lr: float = 2e-5
    """Peak learning rate at a global batch of lr_reference_batch; scaled by sqrt(global/reference)."""
    lr_reference_batch: int = 256
    """The global batch at which `lr` applies unscaled."""
    warmup_steps: int = 0
    """Linear warmup steps, then cosine decay to min_lr_ratio x peak at max_steps."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0: off)."""
    stage: Literal[1, 2] = 2
    """1: freeze the LLM, train projector and vision head (MetaMorph stage 1); 2: train everything."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (less memory, ~30% more compute)."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    eval_every: int = 0
    """Evaluate on the mixture's held-out split every this many steps (0: never); such steps also
    checkpoint, since evaluation reads the checkpoint. Writes output_dir/eval/step-N.json."""
    eval_suite: tuple[Literal["understanding", "generation"], ...] = ("understanding", "generation")
    """What `eval_every` evaluates."""
    eval_max_per_source: int = 64
    """Held-out samples per source that `eval_every` evaluates."""
    seed: int = 0
    """Seed of the model's initialisation."""
    deepspeed: str | None = None
    """DeepSpeed JSON; default infra/deepspeed/zero3_cpu.json on CPU, zero3_gpu_bf16.json on GPU."""
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = ()
    """Extra metric sinks, off by default (metrics.jsonl is always written)."""

    def __post_init__(self):
        problems = []
        for name in ("micro_batch_size", "grad_accum", "max_steps", "save_every", "lr_reference_batch",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_max_per_source < 1:
            problems.append(f"eval_every / eval_max_per_source: expected >= 0 / >= 1, got {self.eval_every} / "
                            f"{self.eval_max_per_source}")
        if self.eval_every and self.data.mixture is None:
            problems.append("eval_every: evaluation needs data.mixture with a heldout split (synthetic data has none)")
        if not self.lr > 0:
            problems.append(f"lr: expected > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps: expected 0..max_steps ({self.max_steps}), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio: expected 0..1, got {self.min_lr_ratio}")
        if self.stage not in (1, 2):
            problems.append(f"stage: expected 1 (frozen LLM) or 2 (all), got {self.stage!r}")
        if problems:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        inner = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        if len(inner) != len(value):
            raise ValueError(f"{where}: expected {len(inner)} values, got {len(value)}")
        return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(inner, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from plain values; unknown keys and wrong types name their path."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}" if where != "config" else k) for k, v in data.items()})


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training YAML; relative paths (output_dir, data.mixture, model.llm/tokenizer folders,
    deepspeed) resolve against the YAML's folder. `overrides` are dotted keys (data.max_len: 256)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key, value in (overrides or {}).items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    folder = path.resolve().parent

    def resolve(d: dict, key: str, keep: tuple[str, ...] = ()) -> None:
        v = d.get(key) if isinstance(d, dict) else None
        if isinstance(v, str) and v not in keep and not Path(v).is_absolute():
            d[key] = str(folder / v)

    resolve(data, "output_dir")
    resolve(data, "deepspeed")
    resolve(data.get("data"), "mixture")
    resolve(data.get("model"), "llm", keep=("tiny",))
    resolve(data.get("model"), "tokenizer", keep=("qwen2.5",))
    return from_dict(TrainConfig, data)
