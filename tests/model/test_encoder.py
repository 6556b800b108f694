"""The vision encoder wrapper against a direct transformers forward, pooled by hand in numpy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vpit.model.encoder import EncoderConfig, VisionEncoder, load_encoder, tiny_encoder, tiny_siglip_config
from vpit.shapes import random_scene, render


def _images(n: int = 4, size: int = 64):
    rng = np.random.default_rng(7)
    return [render(random_scene(rng), size) for _ in range(n)]


def _bilinear_by_hand(grid: np.ndarray, s: int) -> np.ndarray:
    """(n, g, g, d) -> (n, s, s, d): half-pixel centres (align_corners=False), edge-clamped,
    written from the definition rather than calling torch."""
    g = grid.shape[1]
    src = np.maximum((np.arange(s) + 0.5) * (g / s) - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, g - 1)
    w = src - i0
    rows = grid[:, i0] * (1 - w)[None, :, None, None] + grid[:, i1] * w[None, :, None, None]
    return rows[:, :, i0] * (1 - w)[None, None, :, None] + rows[:, :, i1] * w[None, None, :, None]


def _avg_by_hand(grid: np.ndarray, s: int) -> np.ndarray:
    g = grid.shape[1]
    edges = [(int(np.floor(i * g / s)), int(np.ceil((i + 1) * g / s))) for i in range(s)]
    return np.stack([np.stack([grid[:, a:b, c:d].mean(axis=(1, 2)) for c, d in edges], 1) for a, b in edges], 1)


def _reference(hidden: torch.Tensor, grid: int, s: int, pooling: str, normalize: bool) -> np.ndarray:
    h = hidden.detach().numpy().astype(np.float64)
    n, t, d = h.shape
    g = h[:, t - grid * grid :].reshape(n, grid, grid, d)
    pooled = (_bilinear_by_hand if pooling == "bilinear" else _avg_by_hand)(g, s).reshape(n, s * s, d)
    if normalize:
        pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled


@pytest.mark.parametrize(
    ("layer", "pooling", "tokens", "normalize"),
    [
        (-1, "bilinear", 64, "l2"),  # the reference recipe: 14x14 -> 8x8
        (1, "avg", 16, "l2"),
        (-2, "bilinear", 36, "none"),
    ],
)
def test_tokens_equal_direct_forward_pooled_by_hand(layer, pooling, tokens, normalize):
    from transformers import SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    enc = tiny_encoder(EncoderConfig(layer=layer, pooling=pooling, tokens=tokens, normalize=normalize, dtype="fp32"))
    images = _images()
    got = enc.encode(images)

    torch.manual_seed(0)  # the tiny encoder's documented seed
    model = SiglipVisionModel(tiny_siglip_config()).eval()
    pixels = SiglipImageProcessorPil(size={"height": 56, "width": 56})(images=images, return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    want = _reference(hidden, 14, int(tokens**0.5), pooling, normalize == "l2")
    assert got.shape == (4, tokens, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_clip_from_local_folder_drops_cls(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vc = CLIPVisionConfig(
        image_size=48, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(3)
    model = CLIPVisionModel(vc).eval()
    proc = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")

    enc = load_encoder(EncoderConfig(encoder=str(tmp_path / "clip"), tokens=16, dtype="fp32"))
    images = _images(3)
    with torch.no_grad():
        hidden = model(
            pixel_values=proc(images=images, return_tensors="pt")["pixel_values"], output_hidden_states=True
        ).hidden_states[-1]
    assert hidden.shape[1] == 37  # CLS + 6x6 patches
    np.testing.assert_allclose(enc.encode(images), _reference(hidden, 6, 4, "bilinear", True), atol=1e-5, rtol=0)
    assert enc.settings()["model_type"] == "clip_vision_model"
    assert enc.settings()["processor"]["class"] == "CLIPImageProcessorPil"


def test_fingerprint_is_stable():
    a, b = tiny_encoder(), tiny_encoder()
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    assert a.settings() == b.settings()
    s = a.settings()
    assert (s["encoder"], s["layer"], s["pooling"], s["tokens"], s["normalize"], s["dtype"]) == (
        "tiny-siglip",
        -1,
        "bilinear",
        64,
        "l2",
        "fp16",
    )
    assert s["resolution"] == [56, 56] and s["grid"] == [14, 14] and s["weights"].startswith("sha256:")


def test_fingerprint_of_a_folder_ignores_where_it_lives(tmp_path):
    enc = tiny_encoder()
    for name in ("a", "b"):
        enc.model.save_pretrained(tmp_path / name)
        enc.processor.save_pretrained(tmp_path / name)
    fa = load_encoder(EncoderConfig(encoder=str(tmp_path / "a"))).fingerprint()
    assert fa == load_encoder(EncoderConfig(encoder=str(tmp_path / "b"))).fingerprint()


def test_fingerprint_changes_with_every_setting():
    base = EncoderConfig()
    enc = tiny_encoder(base)
    prints = {"base": enc.fingerprint()}
    for field, value in [
        ("layer", -2),
        ("pooling", "avg"),
        ("tokens", 16),
        ("normalize", "none"),
        ("dtype", "bf16"),
        ("compute_dtype", "bf16"),
    ]:
        prints[field] = tiny_encoder(dataclasses.replace(base, **{field: value})).fingerprint()
    prints["weights"] = tiny_encoder(base, seed=1).fingerprint()
    prints["resolution"] = tiny_encoder(base, image_size=64).fingerprint()
    proc = enc.processor.__class__(size={"height": 56, "width": 56}, image_mean=[0.4, 0.5, 0.5])
    prints["processor"] = VisionEncoder(enc.model, proc, config=base, identity=enc.identity).fingerprint()
    prints["encoder id"] = VisionEncoder(
        enc.model, enc.processor, config=base, identity={**enc.identity, "encoder": "other"}
    ).fingerprint()
    assert len(set(prints.values())) == len(prints), prints


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match=r"tokens: must be a perfect square \(64 = 8x8\), got 60"):
        EncoderConfig(tokens=60)
    with pytest.raises(ValueError, match=r"pooling: expected one of bilinear, avg, got 'max'"):
        EncoderConfig(pooling="max")
    with pytest.raises(ValueError, match=r"layer: 5 is out of range for a 2-layer encoder \(use -3..2\)"):
        tiny_encoder(EncoderConfig(layer=5))
    with pytest.raises(ValueError, match=r"neither a local folder nor in the local Hugging Face cache.*hf download"):
        load_encoder(EncoderConfig(encoder="no-such-org/no-such-siglip"))
