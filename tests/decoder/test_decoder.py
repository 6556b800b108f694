"""The diffusion decoder: its parts, its files, and that it learns to draw the image its tokens came from.

The learning test runs the real path: shapes-world records -> Ray ingest -> tiny-SigLIP token
cache (Ray precompute) -> `vpit decoder train` on the cache and the shards' images -> DDIM
samples of held-out tokens, scored against their true images and against the other ones.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpit.cli import main
from vpit.common import subprocess_env, vpit_argv
from vpit.decoder.data import CachePairs, batch_order, preprocess, split_holdout
from vpit.decoder.model import DecoderConfig, build_decoder, decode_tokens, load_decoder
from vpit.decoder.trainer import DecoderTrainConfig, sample_noise

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(width=64, layers=2, heads=2, patch_size=8, projector_hidden=128)
# Enough steps for the tiny DiT to tie held-out tokens to their images, few enough for a CPU test.
LEARN_STEPS = 200


def _tokens(n: int = 2, m: int = 64, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, m, d)).astype(np.float32))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="cfg_drop: expected 0 <= cfg_drop < 1, got 1.5"):
        DecoderConfig(cfg_drop=1.5)
    with pytest.raises(ValueError, match="patch_size: 5 must divide image_size 32"):
        DecoderConfig(patch_size=5)
    with pytest.raises(ValueError, match=r"cond_tokens: must be >= tokens \(64\)"):
        DecoderConfig(cond_tokens=10)
    with pytest.raises(ValueError, match="holdout, guidance: expected >= 0"):
        DecoderTrainConfig(output="x", holdout=-1)


def test_conditioning_is_projected_padded_and_zeroed_when_dropped():
    dec = build_decoder(DecoderConfig(cond_tokens=77, **TINY))
    tok = _tokens(3)
    cond = dec.condition(tok, keep=torch.tensor([True, False, True]))
    assert cond.shape == (3, 77, 64)  # padded to the context length, like SD-1.5's 77
    assert cond[1].abs().sum() == 0  # dropped: the unconditional branch of classifier-free guidance
    assert cond[0, :64].abs().sum() > 0 and cond[0, 64:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"tokens: expected shape \(batch, 64, 32\), got \(3, 64, 16\)"):
        dec.condition(tok[..., :16])


def test_different_tokens_give_different_conditioning_and_predictions():
    dec = build_decoder(DecoderConfig(**TINY))
    x = torch.zeros(2, 3, 32, 32)
    t = torch.tensor([500, 500])
    a, b = _tokens(1, seed=1), _tokens(1, seed=2)
    pa = dec.predict(x[:1], t[:1], dec.condition(a))
    pb = dec.predict(x[:1], t[:1], dec.condition(b))
    assert not torch.allclose(pa, pb)


def test_save_load_round_trip_and_decode_tokens(tmp_path):
    dec = build_decoder(DecoderConfig(**TINY), seed=3)
    tok = _tokens(2)
    before = dec.sample(tok, steps=3, seed=5)
    assert before.shape == (2, 3, 32, 32) and 0 <= before.min() and before.max() <= 1
    dec.save(tmp_path / "dec")
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == [
        "backbone",
        "decoder.json",
        "projector.safetensors",
        "scheduler",
    ]
    after = load_decoder(tmp_path / "dec").sample(tok, steps=3, seed=5)
    assert torch.equal(before, after)
    images = decode_tokens(tmp_path / "dec", tok[0].numpy(), steps=3, seed=5)  # (m, d): one image
    assert len(images) == 1 and images[0].size == (32, 32)
    assert np.array_equal(np.asarray(images[0]), (before[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    with pytest.raises(FileNotFoundError, match="holds no decoder.json"):
        load_decoder(tmp_path)


def test_unet_backbone_and_sd15_style_local_folder(tmp_path):
    """Any UNet2DConditionModel, loaded from a folder laid out like SD-1.5 (unet/, vae/, scheduler/),
    diffusing on the AutoencoderKL's latents, with the conditioning padded to 77 tokens."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    sd = tmp_path / "sd"
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=8,
        norm_num_groups=8,
    ).save_pretrained(sd / "unet")
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(sd / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False).save_pretrained(
        sd / "scheduler"
    )
    dec = build_decoder(DecoderConfig(pretrained=str(sd), vae=str(sd), cond_tokens=77, **TINY))
    assert (dec.config.cond_dim, dec.config.image_size, dec.latent_shape()) == (48, 16, (4, 8, 8))
    assert dec.noise_scheduler.config.beta_schedule == "scaled_linear"
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = dec.loss(pixels, _tokens(2), torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([True, True]))
    loss.backward()
    assert torch.isfinite(loss) and dec.projector.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dec.vae.parameters())  # the VAE stays frozen
    dec.save(tmp_path / "dec")
    out = load_decoder(tmp_path / "dec").sample(_tokens(1), steps=2)
    assert out.shape == (1, 3, 16, 16)
    assert torch.equal(out, dec.sample(_tokens(1), steps=2))


def test_holdout_split_and_batch_order_are_pure_functions():
    names = [f"s{i}#0" for i in range(50)]
    train, held = split_holdout(names, 8)
    assert len(held) == 8 and len(train) == 42 and not set(train) & set(held)
    assert np.array_equal(split_holdout(names[::-1], 8)[1], 49 - held[::-1])  # by name, not by position
    seen = np.concatenate([batch_order(train, 0, k, 6) for k in range(7)])  # exactly one epoch
    assert sorted(seen) == sorted(train)
    assert np.array_equal(batch_order(train, 0, 3, 6), batch_order(train, 0, 3, 6))
    # world size 2: each rank's slice of the same global batch
    assert np.array_equal(
        np.concatenate([batch_order(train, 0, 3, 6)[:3], batch_order(train, 0, 3, 6)[3:]]), batch_order(train, 0, 3, 6)
    )
    n1, t1, k1 = sample_noise(0, np.arange(4), (3, 4, 4), 1000, 0.5)
    n2, t2, k2 = sample_noise(0, np.arange(2, 4), (3, 4, 4), 1000, 0.5)
    assert torch.equal(n1[2:], n2) and torch.equal(t1[2:], t2) and torch.equal(k1[2:], k2)


# ------------------------------------------------------------------------------------------
# On the real cache: shards + tiny SigLIP tokens
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_dataset(ray_local, tmp_path_factory):
    from vpit.demo.corpora import write_llava_dataset
    from vpit.model.encoder import EncoderConfig
    from vpit.pipelines.ingest import run_ingest
    from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
    from vpit.pipelines.precompute import PrecomputeConfig, run_precompute

    out = tmp_path_factory.mktemp("decoder")
    info = write_llava_dataset(out / "raw", 280, seed=1)
    adapter = LlavaAdapter(
        LlavaConfig(
            input=str(info["jsonl"]), image_root=str(out / "raw"), source="shapes", shard_size=100, max_pixels=4_000_000
        )
    )
    run_ingest(adapter, out / "ds", workers=2, progress=False)
    report = run_precompute(out / "ds", EncoderConfig(encoder="tiny"), PrecomputeConfig(batch_size=32), progress=False)
    return out / "ds", report.fingerprint


def test_pairs_read_every_image_with_its_cached_tokens(cached_dataset):
    from vpit.pipelines.shards import Dataset
    from vpit.pipelines.token_cache import TokenCache

    root, fp = cached_dataset
    pairs = CachePairs(root, fp, 32)
    ds = Dataset(root)
    n_images = sum(len(s.record["images"]) for s in ds)
    assert len(pairs) == n_images > 250 and len(set(pairs.names)) == len(pairs)
    # a two-image sample: both images, in record order, each with its own token row
    idx = next(i for i, n in enumerate(pairs.names) if n.endswith("#1"))
    shard, pos, k = pairs._where[idx]
    sample = ds.read(shard, pos)
    pix, tok = pairs[idx]
    assert np.array_equal(pix, preprocess(sample.images[1], 32))
    assert np.array_equal(tok, TokenCache(root, fp).tokens(shard, pos)[1])
    assert pairs.names[idx] == f"{sample.record['id']}#1"


@pytest.fixture(scope="module")
def trained(cached_dataset, tmp_path_factory):
    root, fp = cached_dataset
    out = tmp_path_factory.mktemp("decoder-run") / "dec"
    sets = [f"--set=decoder.{k}={v}" for k, v in TINY.items()]
    rc = main(
        [
            "decoder",
            "train",
            str(root),
            "--cache",
            fp,
            "--output",
            str(out),
            "--steps",
            str(LEARN_STEPS),
            "--set=holdout=24",
            "--set=log_every=10",
            "--set=lr=0.001",
            "--set=sample_steps=20",
            *sets,
        ]
    )
    assert rc == 0
    return root, fp, out


def test_decoded_held_out_tokens_look_like_their_own_images(trained, capsys):
    """The must-show: conditioning works. Samples of tokens the decoder never trained on are
    clearly nearer (pixel MSE) to the image the tokens came from than to the other images."""
    root, fp, out = trained
    summary = json.loads((out / "summary.json").read_text())
    held = summary["heldout"]
    assert held["pairs"] == 24
    assert held["matched_mse"] < 0.6 * held["mismatched_mse"], held
    assert held["retrieval_top1"] >= 2 * held["chance"], held
    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == list(range(10, LEARN_STEPS + 1, 10))
    assert losses[-1]["loss"] < 0.5 * losses[0]["loss"]
    for name in ("decoder.json", "loss.png", "heldout.png", "heldout.json", "train_config.json"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "heldout.json").read_text())
    train_names = set(CachePairs(root, fp, 32).names) - set(scores["names"])
    assert len(train_names) == summary["train_pairs"]  # the held-out pairs were never trained on


def test_decoder_sample_cli_writes_pngs_of_held_out_tokens(trained, tmp_path, capsys):
    root, fp, out = trained
    pairs = CachePairs(root, fp, 32)
    names = json.loads((out / "heldout.json").read_text())["names"][:4]
    idx = [pairs.names.index(n) for n in names]
    pix, tok = pairs.batch(idx)
    np.save(tmp_path / "one.npy", tok[0].numpy())
    np.save(tmp_path / "four.npy", tok.numpy())
    assert (
        main(["decoder", "sample", str(tmp_path / "one.npy"), "--decoder", str(out), "-o", str(tmp_path / "a.png")])
        == 0
    )
    assert (
        main(["decoder", "sample", str(tmp_path / "four.npy"), "--decoder", str(out), "-o", str(tmp_path / "b.png")])
        == 0
    )
    assert "decoded 4 image(s) of 32x32" in capsys.readouterr().out
    got = np.stack([np.asarray(Image.open(tmp_path / f"b-{i}.png"), dtype=np.float32) / 255 for i in range(4)])
    truth = ((pix.numpy() + 1) / 2).transpose(0, 2, 3, 1)
    mse = ((got[:, None] - truth[None]) ** 2).mean(axis=(2, 3, 4))
    assert np.trace(mse) / 4 < (mse.sum() - np.trace(mse)) / 12  # own image nearer than the others, on average
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    assert main(["decoder", "sample", str(tmp_path / "missing.npy"), "--decoder", str(out), "-o", "x.png"]) == 2
    assert "missing.npy does not exist" in capsys.readouterr().err


def test_train_cli_errors_are_plain(cached_dataset, tmp_path, capsys):
    root, fp = cached_dataset
    assert main(["decoder", "train", str(root), "--cache", "0123456789abcdef", "-o", str(tmp_path / "x")]) == 2
    assert "no token cache with fingerprint 0123456789abcdef" in capsys.readouterr().err
    assert main(["decoder", "train", str(root), "--cache", fp, "-o", str(tmp_path / "x"), "--set", "steps=0"]) == 2
    assert "steps: expected >= 1, got 0" in capsys.readouterr().err
    assert (
        main(["decoder", "train", str(root), "--cache", fp, "-o", str(tmp_path / "x"), "--set", "decoder.widht=3"]) == 2
    )
    assert "unknown key(s) widht" in capsys.readouterr().err


def test_deepspeed_zero3_at_world_size_2_matches_the_plain_loop(cached_dataset, tmp_path):
    """The multi-GPU path is the trainer's DeepSpeed ZeRO-3 wiring. Two ranks (torchrun, gloo,
    fp32) of 4 pairs each see the same global batches, noise and CFG drops as one plain PyTorch
    process of 8: the losses agree step by step, and so does the saved decoder."""
    root, fp = cached_dataset
    common = [
        "decoder",
        "train",
        str(root),
        "--cache",
        fp,
        "--steps",
        "4",
        "--set=holdout=0",
        "--set=log_every=1",
        *[f"--set=decoder.{k}={v}" for k, v in TINY.items()],
    ]
    assert main([*common, "--set=batch_size=8", "-o", str(tmp_path / "torch")]) == 0
    proc = subprocess.run(
        vpit_argv(*common, "--set=batch_size=4", "-o", str(tmp_path / "ds"), nproc=2),
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(deepspeed, world size 2)" in proc.stdout
    plain = [json.loads(x)["loss"] for x in (tmp_path / "torch" / "losses.jsonl").read_text().splitlines()]
    ds = [json.loads(x)["loss"] for x in (tmp_path / "ds" / "losses.jsonl").read_text().splitlines()]
    assert len(plain) == len(ds) == 4
    np.testing.assert_allclose(ds, plain, rtol=1e-5)
    a = load_decoder(tmp_path / "torch").state_dict()
    b = load_decoder(tmp_path / "ds").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
