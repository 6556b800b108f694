"""Training options: stage 1 freezes the LLM (with gradient checkpointing and accumulation on),
config mistakes are named plainly, and the lr schedule is warmup + cosine with sqrt scaling."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.conftest import run_vpit
from vpit.cli import main
from vpit.train.config import load_train_config
from vpit.train.export import load_checkpoint_model
from vpit.train.trainer import lr_schedule


@pytest.mark.parametrize("vision_head", [False, True])
def test_stage_1_trains_the_projector_only_or_with_the_head(tmp_path, bpe_tokenizer, vision_head):
    """MetaMorph's stage 1 trains the input projector alone, on the text loss; stage1_vision_head
    also trains the vision head on the vision loss. The LLM never moves (its weights at step 1 and
    step 3 are equal; the model is built sharded, so its init is compared through checkpoints)."""
    cfg = tmp_path / "s1.yaml"
    cfg.write_text(f"""
output_dir: run
model: {{llm: tiny, tokenizer: {bpe_tokenizer}, chat_template: chatml, vision_dim: 32, num_visual_tokens: 16}}
data: {{synthetic: 64, max_len: 256, num_workers: 0}}
micro_batch_size: 4
grad_accum: 2
max_steps: 3
lr: 1e-2
lr_reference_batch: 2
stage: 1
stage1_vision_head: {str(vision_head).lower()}
gradient_checkpointing: true
save_every: 1
keep_checkpoints: 5
""")
    res = run_vpit(["train", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    first, _ = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "step-00000001")
    last, _ = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "step-00000003")
    for name, p in first.llm.state_dict().items():
        assert torch.equal(p, last.llm.state_dict()[name]), f"frozen LLM weight {name} changed"
    assert not torch.allclose(first.projector[0].weight, last.projector[0].weight), "the projector did not train"
    head_moved = not torch.equal(first.vision_head[0].weight, last.vision_head[0].weight)
    assert head_moved == vision_head
    assert "trained 3 steps (global batch 8, lr 0.02)" in res.stdout  # 1e-2 x sqrt(8 / 2)


def test_config_mistakes_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "output_dir: x\nmodel: {llm: tiny, tokenizer: qwen2.5, chatt_template: chatml}\ndata: {synthetic: 10}\n"
    )
    with pytest.raises(ValueError, match=r"model: unknown key\(s\) chatt_template"):
        load_train_config(cfg)
    cfg.write_text("output_dir: x\nmodel: {llm: tiny, tokenizer: qwen2.5}\ndata: {synthetic: 10}\nstage: 3\nlr: -1\n")
    with pytest.raises(ValueError, match=r"(?s)stage: expected one of \[1, 2\], got 3"):
        load_train_config(cfg)
    cfg.write_text(
        "output_dir: x\nmodel: {llm: tiny, tokenizer: qwen2.5}\ndata: {synthetic: 10}\nlr: -1\nwarmup_steps: 500\n"
    )
    with pytest.raises(ValueError, match=r"(?s)lr: expected > 0.*warmup_steps: expected 0..max_steps"):
        load_train_config(cfg)
    cfg.write_text("output_dir: x\nmodel: {llm: /no/such/model}\ndata: {synthetic: 10}\n")
    assert main(["train", str(cfg)]) == 2
    assert "model.llm: expected 'tiny' or a local model folder" in capsys.readouterr().err


def test_lr_schedule_warmup_then_cosine_and_sqrt_batch_scaling():
    sched = [lr_schedule(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert sched[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(sched[4:], sched[5:]))
    assert math.isclose(lr_schedule(20, 4, 20, 0.1), 0.1)
    assert math.isclose(lr_schedule(12, 4, 20, 0.1), 0.1 + 0.9 * 0.5)  # half-way down the cosine
