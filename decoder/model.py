"""The diffusion decoder: m x d visual tokens -> pixels, as MetaMorph does with Stable Diffusion 1.5.

A small projector (MetaMorph's `mlp` mode: Linear -> LayerNorm -> activation per layer) turns
the tokens into the cross-attention conditioning that a text encoder would otherwise give,
zero-padded to the backbone's context length (77 for SD-1.5). Classifier-free guidance is
learned the way MetaMorph learns it: with probability `cfg_drop` a sample's conditioning is
set to zeros, and at sampling time the zero conditioning gives the unconditional branch.
Training is DDPM (noise prediction), sampling DDIM, both from diffusers' schedulers.

The backbone is any diffusers `UNet2DConditionModel` or a DiT-style `Transformer2DModel`
(adaLN-single + cross-attention, as in PixArt), built from a tiny config in code or loaded
from a local folder (a whole SD-1.5 folder works: its `unet/`, `vae/` and `scheduler/` are
used). With `vae` the diffusion runs on the `AutoencoderKL` latents; without it, on pixels.
Pixel space is the tiny default on purpose: a 32x32 image is 3x32x32 numbers, about what a
256x256 image is as SD latents, so a CPU can train it in minutes, and a random-initialised
VAE would first have to be trained itself. The tiny default backbone is the DiT for the same
reason: at 32x32 a patch-4 DiT attends over 64 tokens, where a UNet runs full-resolution
convolutions, tens of times slower on a CPU.

Nothing here imports DeepSpeed: `train/decoder_train.py` wraps the module for that.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpit.config import path_field
from vpit.errors import ConfigError, InputError

__all__ = ["DecoderConfig", "TokenProjector", "VisualDecoder", "build_decoder", "decode_tokens", "load_decoder"]

FORMAT = 1
CONFIG_FILE = "decoder.json"
PROJECTOR_FILE = "projector.safetensors"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DecoderConfig:
    """The decoder's architecture. With `pretrained`, the backbone's own config decides
    `image_size`, `cond_dim` and the channels; the saved decoder.json records what was used."""

    tokens: int = 64
    """m, visual tokens per image (the token cache's m)."""
    token_dim: int = 32
    """d, width of a visual token (the token cache's d; 1152 for SigLIP so400m)."""
    backbone: Literal["dit", "unet"] = "dit"
    """tiny backbone built in code: a DiT-style Transformer2DModel or a UNet2DConditionModel."""
    pretrained: str | None = path_field(None)
    """local folder of a diffusers UNet2DConditionModel/Transformer2DModel, or of a whole SD-1.5
    pipeline (its unet/ is used); overrides `backbone` and the tiny sizes."""
    vae: str | None = path_field(None)
    """local AutoencoderKL folder (or an SD-1.5 folder with vae/): diffuse on its latents. None: pixels."""
    image_size: int = 32
    """output side in pixels (tiny backbone)."""
    cond_dim: int = 64
    """cross-attention width (tiny backbone; 768 for SD-1.5)."""
    cond_tokens: int | None = None
    """context length the conditioning is zero-padded to (77 for SD-1.5); None: m."""
    projector_hidden: int = 256
    """projector hidden width (MetaMorph: 4096)."""
    projector_layers: int = 2
    """projector Linear layers (MetaMorph: 3)."""
    position_embedding: bool = True
    """add a learned embedding per token position before the projector: cross-attention ignores
    the order of its keys, and a token's place in the s x s grid is where it is in the image."""
    width: int = 128
    """tiny backbone width (DiT hidden size; the UNet's deepest channels)."""
    layers: int = 4
    """tiny DiT blocks (the tiny UNet has two levels of one block each)."""
    heads: int = 4
    """tiny DiT attention heads."""
    patch_size: int = 4
    """tiny DiT patch side."""
    cfg_drop: float = 0.1
    """probability of training a sample with zeroed conditioning (classifier-free guidance)."""
    train_timesteps: int = 1000
    """DDPM timesteps."""
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "sample"
    """what a new backbone predicts: the noise (SD-1.5's choice), the velocity (SD-2), or the clean image.
    A backbone loaded with its scheduler/ keeps its own. `sample` for the tiny pixel decoder: with the
    cosine schedule the last timestep is pure noise, where noise prediction says nothing about the
    image, and predicting the image makes the model read its conditioning at every noise level
    (shapes world, 400 steps: held-out MSE own/other image 0.87 with epsilon, 0.36 v, 0.27 sample)."""
    beta_schedule: Literal["auto", "linear", "scaled_linear", "squaredcos_cap_v2"] = "auto"
    """auto: SD-1.5's scaled_linear on latents, the cosine schedule on pixels (better at low resolution)."""

    def __post_init__(self):
        problems = []
        for name in (
            "tokens",
            "token_dim",
            "image_size",
            "cond_dim",
            "projector_hidden",
            "projector_layers",
            "width",
            "layers",
            "heads",
            "patch_size",
            "train_timesteps",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cfg_drop < 1.0:
            problems.append(f"cfg_drop: expected 0 <= cfg_drop < 1, got {self.cfg_drop}")
        if self.cond_tokens is not None and self.cond_tokens < self.tokens:
            problems.append(f"cond_tokens: must be >= tokens ({self.tokens}) or null, got {self.cond_tokens}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            problems.append(f"prediction_type: expected epsilon, v_prediction or sample, got {self.prediction_type!r}")
        if self.backbone not in ("dit", "unet"):
            problems.append(f"backbone: expected 'dit' or 'unet', got {self.backbone!r}")
        if self.pretrained is None and self.backbone == "dit":
            if self.image_size % self.patch_size:
                problems.append(f"patch_size: {self.patch_size} must divide image_size {self.image_size}")
            if self.width % self.heads:
                problems.append(f"heads: {self.heads} must divide width {self.width}")
        if self.pretrained is None and self.backbone == "unet" and (self.width % 16 or self.image_size % 2):
            problems.append(
                f"width: the tiny UNet needs a multiple of 16 and an even image_size, got {self.width}, "
                f"{self.image_size}"
            )
        if problems:
            raise ConfigError("invalid decoder config:\n  - " + "\n  - ".join(problems))


class TokenProjector(nn.Module):
    """Visual tokens (B, m, d) -> cross-attention conditioning (B, m, cond_dim)."""

    def __init__(self, config: DecoderConfig, cond_dim: int):
        super().__init__()
        dims = [config.token_dim] + [config.projector_hidden] * (config.projector_layers - 1) + [cond_dim]
        self.position = (
            nn.Parameter(torch.zeros(1, config.tokens, config.token_dim)) if config.position_embedding else None
        )
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(b) for b in dims[1:])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens if self.position is None else tokens + self.position
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            x = norm(layer(x))
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def _subfolder(path: Path, names: tuple[str, ...]) -> Path:
    """`path/name` for the first name that holds a config.json, else `path` (a model folder itself)."""
    for name in names:
        if (path / name / "config.json").is_file():
            return path / name
    return path


def _load_backbone(path: str) -> nn.Module:
    from diffusers import Transformer2DModel, UNet2DConditionModel

    folder = _subfolder(Path(path).expanduser(), ("unet", "transformer"))
    if not (folder / "config.json").is_file():
        raise ConfigError(f"pretrained: {path} holds no diffusers model (config.json, or unet/config.json)")
    kind = json.loads((folder / "config.json").read_text())["_class_name"]
    classes = {"UNet2DConditionModel": UNet2DConditionModel, "Transformer2DModel": Transformer2DModel}
    if kind not in classes:
        raise ConfigError(f"pretrained: {folder} is a {kind}; expected UNet2DConditionModel or Transformer2DModel")
    # low_cpu_mem_usage=False: the default wants `accelerate`, which vpit does not need.
    return classes[kind].from_pretrained(folder, low_cpu_mem_usage=False)


def _tiny_backbone(c: DecoderConfig, channels: int, size: int) -> nn.Module:
    from diffusers import Transformer2DModel, UNet2DConditionModel

    if c.backbone == "dit":
        return Transformer2DModel(
            sample_size=size,
            patch_size=c.patch_size,
            in_channels=channels,
            out_channels=channels,
            num_layers=c.layers,
            num_attention_heads=c.heads,
            attention_head_dim=c.width // c.heads,
            cross_attention_dim=c.cond_dim,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            activation_fn="gelu-approximate",
            use_additional_conditions=False,
            num_embeds_ada_norm=c.train_timesteps,
        )
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(c.width // 2, c.width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=c.cond_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


class VisualDecoder(nn.Module):
    """Projector + diffusion backbone (+ frozen VAE). Build with `build_decoder`/`load_decoder`."""

    def __init__(
        self,
        config: DecoderConfig,
        backbone: nn.Module,
        vae: nn.Module | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        from diffusers import DDPMScheduler

        bc = backbone.config
        cond_dim = bc.cross_attention_dim
        cond_dim = cond_dim[0] if isinstance(cond_dim, (list, tuple)) else cond_dim
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        # The config as used: a loaded backbone decides its own resolution and width.
        self.config = dataclasses.replace(
            config, cond_dim=int(cond_dim), image_size=int(bc.sample_size) * self.vae_scale
        )
        self.projector = TokenProjector(self.config, self.config.cond_dim)
        self.backbone = backbone
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.channels = int(bc.in_channels)
        self.is_unet = type(backbone).__name__ == "UNet2DConditionModel"
        if scheduler_config is None:
            schedule = (
                config.beta_schedule
                if config.beta_schedule != "auto"
                else ("scaled_linear" if vae is not None else "squaredcos_cap_v2")
            )
            betas = {"beta_start": 0.00085, "beta_end": 0.012} if schedule == "scaled_linear" else {}
            scheduler_config = {
                "num_train_timesteps": config.train_timesteps,
                "beta_schedule": schedule,
                "clip_sample": vae is None,
                "prediction_type": config.prediction_type,
                **betas,
            }
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)

    # ---- conditioning ---------------------------------------------------------------
    def condition(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, m, d) tokens -> (B, cond_tokens, cond_dim); rows with keep=False become zeros (CFG)."""
        c = self.config
        if tokens.ndim != 3 or tokens.shape[1:] != (c.tokens, c.token_dim):
            raise ConfigError(f"tokens: expected shape (batch, {c.tokens}, {c.token_dim}), got {tuple(tokens.shape)}")
        cond = self.projector(tokens)
        if keep is not None:
            cond = cond * keep.to(cond.dtype)[:, None, None]
        pad = (c.cond_tokens or c.tokens) - c.tokens
        return F.pad(cond, (0, 0, 0, pad)) if pad else cond

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.is_unet:
            return self.backbone(x, t, encoder_hidden_states=cond).sample
        out = self.backbone(
            x, encoder_hidden_states=cond, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}
        ).sample
        return out[:, : self.channels]  # DiT/PixArt checkpoints may also predict the variance

    # ---- pixels <-> diffusion space -------------------------------------------------
    def to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> what the backbone diffuses."""
        if self.vae is None:
            return pixels
        with torch.no_grad():
            return self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    # ---- training ----------------------------------------------------------------------
    def loss(
        self,
        pixels: torch.Tensor,
        tokens: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """DDPM loss: MSE to the noise, the velocity or the clean latents (`prediction_type`).
        The caller draws `noise` (like the latents), `timesteps` and
        `keep` (False = train this sample unconditioned), so that they can be seeded per sample."""
        latents = self.to_latents(pixels)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        kind = self.noise_scheduler.config.prediction_type
        target = {"epsilon": noise, "sample": latents}.get(kind)
        if target is None:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(self.predict(noisy, timesteps, self.condition(tokens, keep)).float(), target.float())

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.config.image_size // self.vae_scale
        return self.channels, side, side

    # ---- sampling ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, tokens: torch.Tensor, *, steps: int = 25, guidance: float = 2.0, seed: int = 0) -> torch.Tensor:
        """DDIM with classifier-free guidance: (B, m, d) tokens -> (B, 3, H, W) images in [0, 1]."""
        from diffusers import DDIMScheduler

        if steps < 1:
            raise ConfigError(f"steps: expected >= 1, got {steps}")
        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config, timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        param = next(self.backbone.parameters())
        tokens = tokens.to(param.device, param.dtype)
        cond = self.condition(tokens)
        both = torch.cat([torch.zeros_like(cond), cond])
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((tokens.shape[0], *self.latent_shape()), generator=gen).to(param.device, param.dtype)
        for t in scheduler.timesteps:
            tt = torch.full((2 * x.shape[0],), int(t), device=x.device, dtype=torch.long)
            uncond, conditioned = self.predict(torch.cat([x, x]), tt, both).chunk(2)
            eps = uncond + guidance * (conditioned - uncond)
            x = scheduler.step(eps, t, x).prev_sample
        return ((self.to_pixels(x).float() + 1) / 2).clamp(0, 1).cpu()

    # ---- files ----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """decoder.json + projector.safetensors + backbone/ (diffusers) + scheduler/; the VAE stays
        where `config.vae` points (it is frozen, and SD-1.5's is 330 MB)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder / "backbone")
        self.noise_scheduler.save_pretrained(folder / "scheduler")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()},
            str(folder / PROJECTOR_FILE),
        )
        config = dataclasses.asdict(self.config) | {"pretrained": None}
        (folder / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "config": config}, indent=1) + "\n")
        return folder


def _load_vae(path: str) -> nn.Module:
    from diffusers import AutoencoderKL

    folder = _subfolder(Path(path).expanduser(), ("vae",))
    if not (folder / "config.json").is_file():
        raise ConfigError(f"vae: {path} holds no AutoencoderKL (config.json, or vae/config.json)")
    return AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False)


def build_decoder(config: DecoderConfig, seed: int = 0) -> VisualDecoder:
    """A new decoder: the tiny backbone (seeded) or the one `config.pretrained` names, and a fresh projector."""
    vae = _load_vae(config.vae) if config.vae else None
    scheduler_config = None
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
        torch.manual_seed(seed)
        if config.pretrained:
            backbone = _load_backbone(config.pretrained)
            sched = Path(config.pretrained).expanduser() / "scheduler" / "scheduler_config.json"
            if sched.is_file():  # keep the schedule the backbone was trained with
                scheduler_config = json.loads(sched.read_text())
        else:
            channels = vae.config.latent_channels if vae is not None else 3
            scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
            if config.image_size % scale:
                raise ConfigError(f"image_size: {config.image_size} must be a multiple of the VAE's factor {scale}")
            backbone = _tiny_backbone(config, channels, config.image_size // scale)
        return VisualDecoder(config, backbone, vae, scheduler_config)


def load_decoder(folder: str | Path) -> VisualDecoder:
    """A decoder saved by `VisualDecoder.save` (what `vpit decoder train` writes)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{folder} holds no {CONFIG_FILE}: is it a decoder folder (vpit decoder train ...)?")
    saved = json.loads(path.read_text())
    if saved.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {saved.get('format')!r}, this vpit reads format {FORMAT}")
    config = DecoderConfig(**saved["config"])
    vae = _load_vae(config.vae) if config.vae else None
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    decoder = VisualDecoder(config, _load_backbone(str(folder / "backbone")), vae, sched)
    decoder.projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
    return decoder.eval()


def decode_tokens(
    decoder_dir: str | Path, tokens: np.ndarray | torch.Tensor, *, steps: int = 25, guidance: float = 2.0, seed: int = 0
) -> list:
    """Visual tokens (m, d) or (n, m, d) -> n PIL images, with the decoder saved in `decoder_dir`."""
    from PIL import Image

    decoder = load_decoder(decoder_dir)
    t = torch.as_tensor(np.asarray(tokens, dtype=np.float32))
    if t.ndim == 2:
        t = t[None]
    images = decoder.sample(t, steps=steps, guidance=guidance, seed=seed)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
