"""The demo's decoder stage: train the tiny diffusion decoder on the demo's token cache, show
its held-out samples beside their true images, and turn the VPiT model's generated tokens into PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vpit.decoder.data import CachePairs
from vpit.decoder.model import DecoderConfig, decode_tokens
from vpit.decoder.trainer import DecoderTrainConfig, format_summary, train_decoder
from vpit.errors import ConfigError
from vpit.pipelines.token_cache import available_fingerprints

__all__ = ["DEMO_DECODER", "decoder_stage"]

# Small enough for a few minutes of CPU: 32x32 pixels, a 2-block DiT over 16 patches of 8x8.
DEMO_DECODER = DecoderConfig(width=64, layers=2, heads=2, patch_size=8, projector_hidden=128)


def decoder_stage(out: str | Path, steps: int = 400, dataset: str = "generation") -> dict[str, Any]:
    out = Path(out)
    root = out / "datasets" / dataset
    fingerprints = available_fingerprints(root)
    if not fingerprints:
        raise ConfigError(f"{root} has no complete token cache; the precompute stage must run first")
    fp = fingerprints[0]
    cfg = DecoderTrainConfig(
        output=str(out / "decoder"), decoder=DEMO_DECODER, steps=steps, lr=1e-3, holdout=24, sample_steps=20
    )
    print(f"    vpit decoder train {root} --cache {fp} --output {cfg.output} --steps {steps} (tiny DiT)")
    summary = train_decoder(cfg, CachePairs(root, fp, DEMO_DECODER.image_size))
    print(format_summary(summary))
    print(
        f"    held-out samples (top row: true images, bottom row: decoded from their tokens): {cfg.output}/heldout.png"
    )
    generated = sorted((out / "train" / "generated").glob("*.npy"))
    if generated:
        import numpy as np

        pngs = []
        for path in generated:
            image = decode_tokens(cfg.output, np.load(path, allow_pickle=False))[0]
            pngs.append(path.with_suffix(".png"))
            image.save(pngs[-1])
        summary["generated_pngs"] = [str(p) for p in pngs]
        print(f"    vpit decoder sample {generated[0]} --decoder {cfg.output} -o {pngs[0]}  ({len(pngs)} image(s))")
    return summary
