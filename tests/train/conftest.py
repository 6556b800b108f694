"""Fixtures for trainer tests: a small BPE tokenizer folder, a real mixture with a token cache.

Trainer tests run `vpit train` in subprocesses (as a user would launch it, also at world
size 2 with torchrun), with a tokenizer trained on shapes-world text: its few hundred ids
keep a step at milliseconds, where the 150k-id Qwen2.5 vocabulary (used by tests/model)
would make every step pay for a 150k-row embedding.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from vpit.common import subprocess_env, vpit_argv
from vpit.shapes import caption, questions, random_scene

ROOT = Path(__file__).resolve().parents[2]


def shapes_texts(n: int = 400) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        out.append(f"Generate an image of {caption(scene)}. Here is an image based on your request:")
        out += [f"{q} {a}" for q, a in questions(scene)]
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory) -> str:
    from vpit.model.tokenizer import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(shapes_texts(), vocab_size=400).save_pretrained(folder)
    return str(folder)


def run_vpit(
    args: list[str], nproc: int = 1, timeout: int = 300, **popen
) -> subprocess.CompletedProcess | subprocess.Popen:
    """`vpit ARGS` in a subprocess; with nproc > 1 under torchrun (gloo, one thread per rank)."""
    # never inherit a rendezvous left in os.environ by a trainer that ran inside the test process
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = vpit_argv(*args, nproc=nproc)
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, **popen)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def train_mixture(ray_local, tmp_path_factory) -> dict:
    """A real dataset (shard store) with a real token cache (tiny SigLIP, 4 tokens) and a spec."""
    from tests.mixtures.helpers import make_dataset
    from vpit.model.encoder import EncoderConfig
    from vpit.pipelines.precompute import PrecomputeConfig, run_precompute

    root = tmp_path_factory.mktemp("trainmix")
    U, G, T = "understanding", "generation", "text"
    data = make_dataset(root / "data", "shapes", [[U, G] * 10, [G, U, T] * 6])
    report = run_precompute(
        data, EncoderConfig(encoder="tiny", tokens=4), PrecomputeConfig(batch_size=64, actors=1), progress=False
    )
    spec = root / "mix.yaml"
    spec.write_text(f"""
seed: 7
repetition: allow
cache: {report.fingerprint}
sources:
  vqa: {{path: data, group: understanding, kind: understanding}}
  chat: {{path: data, group: understanding, kind: text}}
  pairs: {{path: data, group: generation, kind: generation}}
groups:
  understanding: 200
  generation: 120
""")
    from vpit.mixtures import load_spec, make_plan

    plan = make_plan(load_spec(spec))
    return {"spec": str(spec), "m": plan.m, "d": plan.dim, "hash": plan.hash}


LEARN_STEPS = 320


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, bpe_tokenizer) -> Path:
    """`vpit train` at world size 1 on in-memory shapes-world items (half generation, half VQA)."""
    root = tmp_path_factory.mktemp("learn")
    cfg = root / "train.yaml"
    cfg.write_text(f"""
output_dir: run
model: {{llm: tiny, tokenizer: {bpe_tokenizer}, chat_template: chatml, vision_dim: 32, num_visual_tokens: 16,
         hidden_size: 64, num_heads: 4, intermediate_size: 128, num_layers: 2}}
data: {{synthetic: 3000, max_len: 512, num_workers: 0}}
micro_batch_size: 16
max_steps: {LEARN_STEPS}
lr: 2e-3
lr_reference_batch: 16
warmup_steps: 10
min_lr_ratio: 0.1
save_every: 1000
""")
    res = run_vpit(["train", str(cfg)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run"
