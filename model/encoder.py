"""The frozen vision encoder: images -> m L2-normalised visual tokens of width d.

Wraps any Hugging Face SigLIP or CLIP vision model (a local folder, a model id already in
the local Hugging Face cache, or the tiny random-initialised SigLIP built in code for tests
and the demo) and applies the MetaMorph/Cambrian recipe, each step an option:

1. hidden states of one layer (`layer`, an index into `hidden_states`; -1 = last encoder
   layer, before SigLIP's post-layernorm, as the reference code takes it);
2. reshape to the patch grid (27x27 for siglip-so400m-patch14-384; CLIP's CLS is dropped);
3. pool to an s x s grid, s*s = m: bilinear resize with align_corners=False (reference),
   or adaptive average pooling;
4. L2-normalise each token (or not).

`fingerprint()` hashes everything that changes the numbers, so a token cache written with
one setting is never read with another. Weights are identified by the hub commit when the
model comes from the Hugging Face cache, else by a sha256 of the weight files (a local
folder) or of the state dict (the tiny model): moving a folder keeps its fingerprint,
retraining changes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vpit.errors import ConfigError

__all__ = [
    "EncoderConfig",
    "VisionEncoder",
    "decode_image",
    "load_encoder",
    "preprocess_images",
    "resize_images",
    "tiny_encoder",
    "tiny_siglip_config",
]

CACHE_FORMAT = 1  # bump when the token layout or the recipe's code changes meaning
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EncoderConfig:
    """Which encoder and which recipe: everything here is part of the cache fingerprint."""

    encoder: str = "tiny"
    """`tiny` (random SigLIP built in code), a local model folder, or a model id in the local HF cache."""
    revision: str | None = None
    """hub revision (branch, tag or commit) when `encoder` is a model id."""
    layer: int = -1
    """index into the model's hidden_states: -1 = last encoder layer, 0 = patch embeddings."""
    pooling: Literal["bilinear", "avg"] = "bilinear"
    """how the patch grid becomes s x s: bilinear resize (align_corners=False) or adaptive average pooling."""
    tokens: int = 64
    """m, the visual tokens per image; a perfect square (64 = 8x8)."""
    normalize: Literal["l2", "none"] = "l2"
    """per-token normalisation after pooling."""
    dtype: Literal["fp16", "bf16", "fp32", "int8"] = "fp16"
    """storage dtype of the cache (int8: per-token scale, half the size of fp16)."""
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype of the encoder forward: auto = bf16 on GPUs, fp32 on CPUs (pooling and normalisation
    always run in fp32). The resolved dtype is part of the fingerprint."""

    def __post_init__(self):
        if not self.encoder:
            raise ConfigError("encoder: must name `tiny`, a local model folder or a model id")
        side = int(round(self.tokens**0.5))
        if self.tokens < 1 or side * side != self.tokens:
            raise ConfigError(f"tokens: must be a perfect square (64 = 8x8), got {self.tokens}")
        for name, allowed in (
            ("pooling", ("bilinear", "avg")),
            ("normalize", ("l2", "none")),
            ("dtype", ("fp16", "bf16", "fp32", "int8")),
            ("compute_dtype", ("auto", "fp32", "bf16", "fp16")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def side(self) -> int:
        return int(round(self.tokens**0.5))

    def resolved(self, gpus: bool | None = None) -> EncoderConfig:
        """This config with compute_dtype `auto` made concrete: bf16 where the encoders run on GPUs
        (`gpus`; default: whether this process sees one), else fp32."""
        if self.compute_dtype != "auto":
            return self
        if gpus is None:
            gpus = torch.cuda.is_available()
        return dataclasses.replace(self, compute_dtype="bf16" if gpus else "fp32")


def tiny_siglip_config(image_size: int = 56, patch_size: int = 4, hidden_size: int = 32, layers: int = 2):
    """A SigLIP vision config with the production shape logic and small numbers: a 14x14 patch
    grid pooled to 8x8 is, like 27x27 -> 8x8, a real downsampling."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
    )


def tiny_processor(image_size: int):
    """The production SigLIP processor settings (bicubic resize to the model's square input,
    rescale 1/255, mean = std = 0.5) at the tiny model's resolution. We instantiate the library's
    own SigLIP processor rather than writing one, so tiny and real encoders share every step
    of preprocessing except the size."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def decode_image(data: bytes):
    """Stored image bytes -> an RGB PIL image (the processor would convert too; this makes it explicit)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def preprocess_images(processor, images: list) -> np.ndarray:
    """PIL images -> float32 pixel values (n, 3, H, W) with `processor` (resize, rescale, normalise)."""
    return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)


def resize_images(processor, images: list) -> np.ndarray:
    """PIL images -> uint8 pixels (n, 3, H, W): the processor's resize (and crop) alone. Rescaling
    and normalising happen on the encoder's device (`VisionEncoder.encode_uint8`), so pixels
    travel between the stages at a quarter of their float32 size."""
    out = processor(images=images, return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values"]
    if out.dtype != np.uint8:  # a processor that resizes in float: round back (exact for PIL resizes)
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _files_sha256(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not files:
        raise ConfigError(f"encoder: {folder} holds no weight files (*.safetensors / *.bin)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _load_hf(folder: Path):
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    model_type = AutoConfig.from_pretrained(folder).model_type
    classes = {
        "siglip": SiglipVisionModel,
        "siglip_vision_model": SiglipVisionModel,
        "clip": CLIPVisionModel,
        "clip_vision_model": CLIPVisionModel,
    }
    if model_type not in classes:
        raise ConfigError(f"encoder: {folder} is a {model_type!r} model; expected SigLIP or CLIP")
    model = classes[model_type].from_pretrained(folder)
    # The PIL backend on every machine: torchvision's resize differs in the last bits, and
    # a cache must not depend on which optional package a worker happens to have.
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    return model, processor


class VisionEncoder:
    """A frozen vision model plus the pooling recipe. Build it with `load_encoder`.

    Args:
        model: a SiglipVisionModel or CLIPVisionModel.
        processor: its image processor (resize, rescale, normalise).
        config: the recipe settings.
        identity: what names the weights, e.g. {"encoder": id, "revision": commit} or {"weights": "sha256:..."}.
    """

    def __init__(self, model, processor, *, config: EncoderConfig, identity: dict[str, str]):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        config = config.resolved()
        self.config = config
        self.identity = dict(identity)
        vc = model.config
        self.grid = vc.image_size // vc.patch_size
        self.dim = vc.hidden_size
        self.m = config.tokens
        n_layers = vc.num_hidden_layers
        if not -(n_layers + 1) <= config.layer <= n_layers:
            raise ConfigError(
                f"layer: {config.layer} is out of range for a {n_layers}-layer encoder "
                f"(use {-(n_layers + 1)}..{n_layers})"
            )
        self.device = torch.device("cpu")
        self._compute = TORCH_DTYPES[config.compute_dtype]
        self.model.to(self._compute)

    def to(self, device: str | torch.device) -> VisionEncoder:
        self.device = torch.device(device)
        self.model.to(self.device, self._compute)
        return self

    def preprocess(self, images: list) -> np.ndarray:
        """PIL images -> float32 pixel values (n, 3, H, W), with the model's own processor."""
        return preprocess_images(self.processor, images)

    # ---- the recipe ----------------------------------------------------------------
    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, tokens, d) hidden states -> (n, m, d) pooled, normalised fp32 tokens."""
        n, t, d = hidden.shape
        g, s = self.grid, self.config.side
        if t < g * g:
            raise ConfigError(f"encoder gives {t} tokens, fewer than its {g}x{g} patch grid")
        grid = hidden[:, t - g * g :].float().reshape(n, g, g, d).permute(0, 3, 1, 2)  # drops CLS if any
        if self.config.pooling == "bilinear":
            pooled = F.interpolate(grid, size=(s, s), mode="bilinear", align_corners=False)
        else:
            pooled = F.adaptive_avg_pool2d(grid, (s, s))
        tokens = pooled.flatten(2).transpose(1, 2)
        if self.config.normalize == "l2":
            tokens = F.normalize(tokens, dim=-1)
        return tokens

    @torch.no_grad()
    def encode_pixels(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Pixel values (n, 3, H, W) -> fp32 tokens (n, m, d) on the CPU."""
        x = torch.as_tensor(pixels).to(self.device, self._compute)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return self.pool(out.hidden_states[self.config.layer]).cpu()

    def normalize_uint8(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 pixels (n, 3, H, W) -> the processor's pixel values, computed on the encoder's device."""
        p = self.processor
        x = torch.as_tensor(pixels).to(self.device).float()
        if p.do_rescale:
            x = x * float(p.rescale_factor)
        if p.do_normalize:
            mean = torch.tensor(p.image_mean, dtype=torch.float32, device=self.device)[:, None, None]
            std = torch.tensor(p.image_std, dtype=torch.float32, device=self.device)[:, None, None]
            x = (x - mean) / std
        return x

    def encode_uint8(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 pixels from `resize_images` -> fp32 tokens (n, m, d) on the CPU (the precompute path)."""
        return self.encode_pixels(self.normalize_uint8(pixels))

    def encode(self, images: list) -> np.ndarray:
        """PIL images -> fp32 tokens (n, m, d), before the cast to the storage dtype."""
        return self.encode_uint8(resize_images(self.processor, images)).numpy()

    # ---- fingerprint ---------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that changes the cached numbers, readably."""
        c = self.config
        proc = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_") and k != "processor_class"}
        return {
            "cache_format": CACHE_FORMAT,
            **self.identity,
            "model_type": self.model.config.model_type,
            "layer": c.layer,
            "pooling": c.pooling,
            "tokens": c.tokens,
            "grid": [self.grid, self.grid],
            "dim": self.dim,
            "normalize": c.normalize,
            "resolution": [self.model.config.image_size, self.model.config.image_size],
            "processor": {"class": type(self.processor).__name__, **json.loads(json.dumps(proc, default=str))},
            "dtype": c.dtype,
            "compute_dtype": c.compute_dtype,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_encoder(
    config: EncoderConfig | None = None, *, seed: int = 0, image_size: int = 56, patch_size: int = 4
) -> VisionEncoder:
    """The tiny random SigLIP, seeded so that every process builds the same weights."""
    from transformers import SiglipVisionModel

    _quiet_transformers()
    vc = tiny_siglip_config(image_size=image_size, patch_size=patch_size)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = SiglipVisionModel(vc)
    identity = {"encoder": "tiny-siglip", "weights": "sha256:" + _state_sha256(model)[:32]}
    return VisionEncoder(model, tiny_processor(image_size), config=config or EncoderConfig(), identity=identity)


def load_encoder(config: EncoderConfig) -> VisionEncoder:
    """Load the encoder `config.encoder` names, offline: `tiny`, a local folder, or a cached hub id."""
    if config.encoder == "tiny":
        return tiny_encoder(config)
    _quiet_transformers()
    folder = Path(config.encoder).expanduser()
    if folder.is_dir():
        model, processor = _load_hf(folder)
        return VisionEncoder(
            model, processor, config=config, identity={"weights": "sha256:" + _files_sha256(folder)[:32]}
        )
    if folder.exists() or config.encoder.startswith((".", "/", "~")):
        raise ConfigError(f"encoder: {config.encoder} is not a model folder (expected config.json and weights)")
    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(config.encoder, revision=config.revision, local_files_only=True))
    except Exception as e:  # the hub client raises several types for "not cached"
        raise ConfigError(
            f"encoder: {config.encoder!r} is neither a local folder nor in the local Hugging Face cache "
            f"({type(e).__name__}); on a machine with network run `hf download {config.encoder}`, "
            "or pass a local model folder"
        ) from None
    model, processor = _load_hf(snap)
    return VisionEncoder(model, processor, config=config, identity={"encoder": config.encoder, "revision": snap.name})
