"""`vpit decoder train` and `vpit decoder sample`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vpit.config import Command, Group, path_field
from vpit.decoder.trainer import DecoderTrainConfig
from vpit.errors import ConfigError, InputError

__all__ = ["decoder"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DecoderData:
    dataset: str = path_field()
    """Dataset folder (holds manifest.json and tokens/)."""
    cache: str | None = None
    """Token-cache fingerprint; default: the dataset's only complete cache."""


def _train(cfg: DecoderTrainConfig, data: DecoderData) -> None:
    from vpit.decoder.data import CachePairs
    from vpit.decoder.trainer import format_summary, train_decoder
    from vpit.pipelines.token_cache import available_fingerprints

    fingerprint = data.cache
    if fingerprint is None:
        have = available_fingerprints(data.dataset)
        if len(have) != 1:
            raise ConfigError(
                f"{data.dataset} has {len(have)} complete token caches ({', '.join(have) or 'none'}); "
                "name one with --cache" + ("" if have else ", after `vpit precompute`")
            )
        fingerprint = have[0]
    summary = train_decoder(cfg, CachePairs(data.dataset, fingerprint, cfg.decoder.image_size))
    if summary:  # rank 0
        print(format_summary(summary))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DecoderSampleConfig:
    tokens: str = path_field()
    """.npy of visual tokens, (m, d) or (n, m, d), e.g. from `vpit generate`."""
    decoder: str = path_field()
    """Folder written by `vpit decoder train`."""
    output: str = path_field()
    """PNG path; n images go to OUT-0.png, OUT-1.png, ..."""
    steps: int = 25
    """DDIM steps."""
    guidance: float = 2.0
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of the starting noise."""


def _sample(cfg: DecoderSampleConfig) -> None:
    import numpy as np

    from vpit.decoder.model import decode_tokens

    path = Path(cfg.tokens)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    tokens = np.load(path, allow_pickle=False)
    if tokens.ndim not in (2, 3):
        raise ConfigError(f"{path}: expected tokens of shape (m, d) or (n, m, d), got {tokens.shape}")
    images = decode_tokens(cfg.decoder, tokens, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = (
        [out]
        if len(images) == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(images))]
    )
    for img, p in zip(images, paths):
        img.save(p)
    print(f"decoded {len(images)} image(s) of {images[0].size[0]}x{images[0].size[1]}: {', '.join(map(str, paths))}")


decoder = Group(
    summary="diffusion decoder: train on a token cache, decode tokens to PNGs",
    description="The diffusion decoder: visual tokens -> pixels (MetaMorph's SigLIP-conditioned Stable Diffusion). "
    "`train` fits it on a dataset's images and their cached tokens; `sample` decodes a .npy of tokens to PNGs.",
    commands={
        "train": Command(
            summary="train the decoder on DATASET's images and token cache",
            description="Train the diffusion decoder (a projector into cross-attention + a diffusers UNet or DiT; "
            "DDPM training, classifier-free guidance by dropping the conditioning) on every image of DATASET and its "
            "tokens in the cache --cache. One process here; for several GPUs launch it with `deepspeed --module vpit "
            "decoder train ...` (ZeRO-3, bf16). Writes the decoder, losses.jsonl, loss.png, and held-out samples "
            "scored against their true images (heldout.png, heldout.json).",
            run=_train,
            configs=(DecoderTrainConfig, DecoderData),
            positional=("dataset",),
            short={"output": "-o"},
        ),
        "sample": Command(
            summary="decode visual tokens (.npy) to PNG images",
            description="Decode TOKENS.npy ((m, d) or (n, m, d)) with a trained decoder: DDIM with classifier-free "
            "guidance. One image goes to OUTPUT; n go to OUTPUT-0.png, ...",
            run=_sample,
            configs=(DecoderSampleConfig,),
            positional=("tokens",),
            short={"output": "-o"},
        ),
    },
)
