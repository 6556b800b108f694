"""`vpit decoder train`: fit the diffusion decoder on a dataset's (image, visual tokens) pairs.

One process on a CPU runs a plain PyTorch loop. Launched by `deepspeed` or `torchrun`
(WORLD_SIZE set), or given a DeepSpeed JSON, the same loop runs through the VPiT trainer's
DeepSpeed wiring (train/parallelize.py: ZeRO-3, bf16 on GPU): each rank takes a fixed slice
of every global batch, and every sample's noise, timestep and CFG drop are seeded by its
slot in the global sequence, so the sequence of global batches does not depend on the
world size. Rank 0 writes the losses, saves the decoder and scores it on held-out pairs:
decoded images against their true images, and against the other held-out images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpit.config import path_field
from vpit.decoder.data import CachePairs, batch_order, split_holdout
from vpit.decoder.model import DecoderConfig, VisualDecoder, build_decoder, load_decoder
from vpit.errors import ConfigError

__all__ = ["DecoderTrainConfig", "evaluate_heldout", "format_summary", "sample_noise", "train_decoder"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DecoderTrainConfig:
    """How the decoder is trained (the architecture is `decoder`; m and d come from the cache)."""

    output: str = path_field()
    """folder for the decoder, losses.jsonl, loss.png, heldout.png/json and summary.json."""
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    """the architecture (model/decoder.py)."""
    steps: int = 600
    """optimizer steps."""
    batch_size: int = 32
    """pairs per rank per step; global batch = batch_size x world size."""
    lr: float = 5e-4
    """peak learning rate (tiny decoder; MetaMorph fine-tunes SD-1.5's UNet at 1e-5 or below)."""
    warmup_steps: int = 50
    """linear warmup, then constant (MetaMorph's schedule for a decoder trained from scratch)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """gradient norm clip."""
    seed: int = 0
    """seeds the weights, the batch order, the noise and the CFG drops."""
    holdout: int = 16
    """pairs kept out of training and decoded at the end."""
    sample_steps: int = 25
    """DDIM steps for the held-out samples."""
    guidance: float = 2.0
    """classifier-free guidance scale for the held-out samples."""
    log_every: int = 10
    """steps between lines of losses.jsonl."""
    deepspeed: str | None = path_field(None)
    """a DeepSpeed JSON: train through DeepSpeed even in one process (the default under a launcher:
    infra/deepspeed/zero3_gpu_bf16.json on GPU, zero3_cpu.json on CPU)."""

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "sample_steps", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: expected > 0, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.holdout < 0 or self.guidance < 0:
            problems.append("warmup_steps, weight_decay, holdout, guidance: expected >= 0")
        if problems:
            raise ConfigError("invalid decoder training config:\n  - " + "\n  - ".join(problems))


def sample_noise(
    seed: int, slots: np.ndarray, shape: tuple[int, ...], timesteps: int, cfg_drop: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, timesteps, keep) for the given global slots, each from a generator seeded by its slot."""
    noise, ts, keep = [], [], []
    for slot in slots:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1, int(slot)]).generate_state(1)[0]))
        noise.append(torch.randn(shape, generator=gen))
        ts.append(int(torch.randint(0, timesteps, (1,), generator=gen)))
        keep.append(bool(torch.rand(1, generator=gen) >= cfg_drop))
    return torch.stack(noise), torch.tensor(ts, dtype=torch.long), torch.tensor(keep)


def _schedule(cfg: DecoderTrainConfig):
    return lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0


class _TorchEngine:
    """The single-process path: AdamW + warmup, the same step shape as a DeepSpeed engine."""

    def __init__(self, module: torch.nn.Module, cfg: DecoderTrainConfig):
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg))
        self.clip = cfg.grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()

    def get_lr(self) -> list[float]:
        return self.sched.get_last_lr()


def _deepspeed_engine(module: torch.nn.Module, cfg: DecoderTrainConfig, dist) -> Any:
    from vpit.train.parallelize import ds_config, initialize

    ds = ds_config(
        cfg.deepspeed,
        on_gpu=dist.on_gpu,
        micro_batch_size=cfg.batch_size,
        grad_accum=1,
        world_size=dist.world_size,
        grad_clip=cfg.grad_clip,
    )
    return initialize(
        module.to(dist.device),
        ds,
        lr=cfg.lr,
        betas=(0.9, 0.999),
        weight_decay=cfg.weight_decay,
        schedule=_schedule(cfg),
    )


def _save(decoder: VisualDecoder, out: Path, rank: int, zero3: bool) -> None:
    if not zero3:
        decoder.save(out)
        return
    import deepspeed

    # ZeRO-3 shards every parameter: gather them on all ranks, let rank 0 write the whole model.
    with deepspeed.zero.GatheredParameters(list(decoder.parameters()), modifier_rank=None):
        if rank == 0:
            decoder.save(out)


@torch.no_grad()
def evaluate_heldout(
    decoder: VisualDecoder, pixels: torch.Tensor, tokens: torch.Tensor, *, steps: int, guidance: float, seed: int = 0
) -> tuple[dict[str, float], torch.Tensor]:
    """Decode held-out tokens; score each sample against its own image and the others' images.

    Returns ({matched_mse, mismatched_mse, ratio, retrieval_top1, chance}, samples in [0, 1]).
    MSE is per pixel on [0, 1] RGB; retrieval_top1 is how often a sample is nearest its own image.
    """
    samples = decoder.sample(tokens, steps=steps, guidance=guidance, seed=seed)
    truth = ((pixels.float() + 1) / 2).clamp(0, 1)
    n = len(samples)
    mse = ((samples[:, None] - truth[None]) ** 2).flatten(2).mean(-1)  # (sample, image)
    matched = float(mse.diagonal().mean())
    mismatched = float(mse[~torch.eye(n, dtype=torch.bool)].mean()) if n > 1 else float("nan")
    top1 = float((mse.argmin(1) == torch.arange(n)).float().mean())
    return (
        {
            "matched_mse": matched,
            "mismatched_mse": mismatched,
            "ratio": matched / mismatched,
            "retrieval_top1": top1,
            "chance": 1.0 / n,
            "pairs": n,
        },
        samples,
    )


def _grid_png(path: Path, truth: torch.Tensor, samples: torch.Tensor) -> None:
    """Two rows: true images over their decoded samples."""
    from PIL import Image

    rows = torch.cat([torch.cat(list(truth), dim=2), torch.cat(list(samples), dim=2)], dim=1)
    arr = (rows.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


def _loss_png(path: Path, log: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set(xlabel="step", ylabel="noise-prediction MSE", title="diffusion decoder")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_decoder(cfg: DecoderTrainConfig, pairs: CachePairs, *, progress: bool = True) -> dict[str, Any]:
    """Train on `pairs` (a CachePairs or ArrayPairs); return the summary (also in OUTPUT/summary.json)."""
    from tqdm import tqdm

    start = time.perf_counter()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_ds = launched or cfg.deepspeed is not None
    dcfg = dataclasses.replace(cfg.decoder, tokens=pairs.m, token_dim=pairs.dim, image_size=pairs.image_size)
    decoder = build_decoder(dcfg, seed=cfg.seed)
    if decoder.config.image_size != pairs.image_size:
        raise ConfigError(
            f"decoder.image_size: the backbone makes {decoder.config.image_size}px images; "
            f"set decoder.image_size to {decoder.config.image_size}"
        )
    train_idx, held_idx = split_holdout(pairs.names, cfg.holdout)
    if use_ds:
        from vpit.train.parallelize import init_distributed

        dist = init_distributed()
        engine, rank, world, device = _deepspeed_engine(decoder, cfg, dist), dist.rank, dist.world_size, dist.device
    else:
        engine, rank, world, device = _TorchEngine(decoder, cfg), 0, 1, torch.device("cpu")
    dtype = next(p for p in decoder.parameters()).dtype
    out = Path(cfg.output)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(
            json.dumps(dataclasses.asdict(cfg) | {"decoder": dataclasses.asdict(decoder.config)}, indent=1) + "\n"
        )
    log: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.steps, desc="decoder", unit="step", disable=not progress or rank != 0)
    gb = cfg.batch_size * world
    window: list[float] = []
    for step in range(cfg.steps):
        slots = np.arange(step * gb, (step + 1) * gb)[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        idx = batch_order(train_idx, cfg.seed, step, gb)[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        pix, tok = pairs.batch(idx)
        noise, ts, keep = sample_noise(cfg.seed, slots, decoder.latent_shape(), dcfg.train_timesteps, dcfg.cfg_drop)
        loss = decoder.loss(
            pix.to(device, dtype), tok.to(device, dtype), noise.to(device, dtype), ts.to(device), keep.to(device)
        )
        engine.backward(loss)
        engine.step()
        logged = loss.detach().float()
        if world > 1:  # the global batch's mean loss, the same number at any world size
            torch.distributed.all_reduce(logged)
            logged /= world
        window.append(float(logged))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window[-20:]):.4f}")
        if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            log.append(
                {
                    "step": step + 1,
                    "loss": float(np.mean(window)),
                    "lr": float(engine.get_lr()[0]),
                    "pairs_seen": (step + 1) * gb,
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )
            window = []
            with open(out / "losses.jsonl", "a" if len(log) > 1 else "w", encoding="utf-8") as f:
                f.write(json.dumps(log[-1]) + "\n")
    bar.close()
    train_seconds = time.perf_counter() - start
    _save(decoder, out, rank, zero3=use_ds)
    if rank != 0:
        return {}
    summary: dict[str, Any] = {
        "output": str(out),
        "steps": cfg.steps,
        "world_size": world,
        "pairs": len(pairs),
        "train_pairs": len(train_idx),
        "first_loss": log[0]["loss"],
        "last_loss": log[-1]["loss"],
        "train_seconds": round(train_seconds, 1),
        "engine": "deepspeed" if use_ds else "torch",
    }
    _loss_png(out / "loss.png", log)
    if len(held_idx) > 1:
        saved = load_decoder(out)  # score what was written, the way `vpit decoder sample` will load it
        pix, tok = pairs.batch(held_idx)
        scores, samples = evaluate_heldout(
            saved, pix, tok, steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed
        )
        scores["names"] = [pairs.names[i] for i in held_idx]
        (out / "heldout.json").write_text(json.dumps(scores, indent=1) + "\n")
        _grid_png(out / "heldout.png", (pix + 1) / 2, samples)
        summary["heldout"] = {k: v for k, v in scores.items() if k != "names"}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"decoder trained: {s['steps']} steps on {s['train_pairs']} of {s['pairs']} pairs "
        f"({s['engine']}, world size {s['world_size']}) in {s['train_seconds']:.0f}s",
        f"  loss {s['first_loss']:.4f} (first {min(s['steps'], 10)} steps) -> {s['last_loss']:.4f} (last)",
    ]
    if "heldout" in s:
        h = s["heldout"]
        lines.append(
            f"  held-out ({h['pairs']} pairs): pixel MSE to own image {h['matched_mse']:.4f}, "
            f"to other images {h['mismatched_mse']:.4f} (ratio {h['ratio']:.2f}); "
            f"nearest is own image {h['retrieval_top1']:.0%} (chance {h['chance']:.0%})"
        )
    lines.append(
        f"  wrote {s['output']}/ (decoder.json, backbone/, losses.jsonl, loss.png"
        + (", heldout.png, heldout.json)" if "heldout" in s else ")")
    )
    return "\n".join(lines)
