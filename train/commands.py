"""`vpit train`, `vpit eval`, `vpit export`, `vpit generate`."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from vpit.config import Command, path_field
from vpit.train.config import TrainConfig, TrainJob

__all__ = ["evaluate", "export", "generate", "train"]


def _train(cfg: TrainConfig, job: TrainJob) -> None:
    from vpit.train.trainer import Trainer

    if cfg.stage2_from_phase:
        from vpit.train.stages import train_in_stages

        summary = train_in_stages(cfg, job.resume)
    else:
        summary = Trainer(cfg, resume=job.resume).train()
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = summary["first"] or {}, summary["last"] or {}
        print(
            f"trained {summary['steps']} steps (global batch {summary['global_batch']}, lr {summary['lr']:.3g}): "
            f"text loss {first.get('text_loss', float('nan')):.3f} -> {last.get('text_loss', float('nan')):.3f}, "
            f"vision loss {first.get('vision_loss', float('nan')):.3f} -> {last.get('vision_loss', float('nan')):.3f}"
            f"\nloss curve: {summary['loss_png']}"
        )
        if summary["preempted"]:
            print(f"stopped by {summary['preempted']} after a checkpoint; continue with --resume")


train = Command(
    summary="train a VPiT model on a mixture with DeepSpeed ZeRO-3",
    description="Train a VPiT model (an LLM + input projector + vision head) with DeepSpeed ZeRO-3 on the mixture "
    "that data.mixture names (without one: in-memory synthetic items, a smoke test). Run directly for one "
    "process, or launch several with `torchrun --nproc_per_node N -m vpit train CONFIG` or "
    "`deepspeed --module vpit train CONFIG`. bf16 on GPU, fp32 on CPU (gloo). Writes checkpoints, metrics.jsonl "
    "and loss.png under output_dir.",
    run=_train,
    configs=(TrainConfig, TrainJob),
    config_arg="CONFIG",
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    checkpoint: str = path_field()
    """A run folder (output_dir of vpit train: its latest checkpoint) or one of its checkpoints."""
    suite: tuple[Literal["understanding", "generation"], ...] = ("understanding", "generation")
    """What to evaluate (comma-separated on the command line)."""
    max_per_source: int = 64
    """Held-out samples per source."""


def _evaluate(cfg: EvalConfig) -> None:
    from vpit.train.evaluate import evaluate_run

    metrics = evaluate_run(cfg.checkpoint, suite=cfg.suite, max_per_source=cfg.max_per_source)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


evaluate = Command(
    summary="evaluate a run on its mixture's held-out split",
    description="Evaluate a training run (its latest checkpoint) or a checkpoint folder on the held-out split "
    "of its mixture (the spec's `heldout` fraction, never trained on). Writes RUN/eval/step-N.json. "
    "Understanding: exact match / multiple choice, per-source text loss. Generation: token cosine, retrieval "
    "accuracy, Fréchet distance in the token space.",
    run=_evaluate,
    configs=(EvalConfig,),
    positional=("checkpoint",),
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExportConfig:
    checkpoint: str = path_field()
    """A run folder (its latest complete checkpoint) or a checkpoint folder."""
    output: str = path_field()
    """Folder to write."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Precision of the written weights."""


def _export(cfg: ExportConfig) -> None:
    import torch

    from vpit.train.export import export_checkpoint

    out = export_checkpoint(cfg.checkpoint, cfg.output, getattr(torch, cfg.dtype))
    print(f"exported to {out}: " + ", ".join(sorted(f.name for f in out.iterdir())))


export = Command(
    summary="training checkpoint -> Hugging Face folder (safetensors)",
    description="Merge a ZeRO-3 checkpoint into a Hugging Face folder: the LLM as safetensors (loads with "
    "AutoModelForCausalLM.from_pretrained), the tokenizer, and the projector and vision head beside it.",
    run=_export,
    configs=(ExportConfig,),
    positional=("checkpoint",),
    short={"output": "-o"},
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GenerateConfig:
    checkpoint: str = path_field()
    """An exported folder, a run folder or a checkpoint folder."""
    prompt: str
    """The user message."""
    max_new_tokens: int = 128
    """Tokens to generate at most."""
    image: bool = False
    """Answer with an image where training puts it: the assistant's words before the image
    (--prefix) are fed as given, then <image_start> is forced."""
    prefix: str | None = None
    """With --image, the assistant's text before the image; default: the generation template's
    ("Here is an image based on your request:", what every generation sample trained on)."""
    output: str = path_field("generated")
    """Folder for the .npy files of generated visual tokens."""


def _generate(cfg: GenerateConfig) -> None:
    from vpit.model.chat_template import get_template, stop_ids
    from vpit.model.generate import encode_for_image, encode_prompt, generate, render_generation, save_images
    from vpit.train.export import load_any

    model, tok = load_any(cfg.checkpoint)
    user = {"role": "user", "content": [{"text": cfg.prompt}]}
    stops = stop_ids(tok, get_template(model.config.chat_template))
    shown = ""
    if cfg.image:  # teacher-force the template's words, then the image, as training laid it out
        from vpit.pipelines.templates import load_templates

        prefix = cfg.prefix if cfg.prefix is not None else load_templates().assistant("generation")
        answer = {"role": "assistant", "content": ([{"text": prefix}] if prefix else []) + [{"image": 0}]}
        ids, vis = encode_for_image(model, tok, [user, answer], 0)
        shown = prefix + " "
    else:
        ids, vis = encode_prompt(model, tok, [user])
    gen = generate(model, ids, vis, max_new_tokens=cfg.max_new_tokens, stop_ids=stops, force_image=cfg.image)
    print(shown + render_generation(gen, tok, save_images(gen, cfg.output)))


generate = Command(
    summary="generate text and visual tokens (.npy) from a trained model",
    description="Generate text, and visual tokens wherever the model emits <image_start> (m tokens, each fed back "
    "through the input projector, with a KV cache). Tokens are saved as .npy.",
    run=_generate,
    configs=(GenerateConfig,),
    positional=("checkpoint",),
    short={"output": "-o"},
)
