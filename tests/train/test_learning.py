"""Learning: the trained model's text loss falls, and its generated visual tokens for held-out
captions point far closer to the targets than an untrained model's."""

from __future__ import annotations

import numpy as np
import torch

from tests.train.conftest import LEARN_STEPS
from vpit.model.build import ModelConfig, build_model
from vpit.model.generate import encode_prompt, generate
from vpit.train.export import load_any
from vpit.train.run_log import read_metrics
from vpit.train.synthetic import synthetic_items


def test_text_and_vision_losses_fall(trained_run):
    rows = read_metrics(trained_run)
    assert [r["step"] for r in rows] == list(range(1, LEARN_STEPS + 1))
    first = np.mean([r["text_loss"] for r in rows[:5]])
    last = np.mean([r["text_loss"] for r in rows[-5:]])
    assert last < 0.5 * first, (first, last)
    assert np.mean([r["vision_loss"] for r in rows[-5:]]) < 0.5 * np.mean([r["vision_loss"] for r in rows[:5]])
    assert all(r["tokens_per_s"] > 0 and r["samples"] == 16 for r in rows)
    assert (trained_run / "loss.png").stat().st_size > 1000


def _cosines(model, tok, items, force: bool) -> list[float]:
    out = []
    for it in items:
        ids, vis = encode_prompt(model, tok, it["record"]["messages"][:1])
        gen = generate(
            model, ids, vis, max_new_tokens=40, stop_ids=(tok.convert_tokens_to_ids("<|im_end|>"),), force_image=force
        )
        target = it["tokens"][0]
        out.append(float((gen.images[0] * target).sum(-1).mean()) if gen.images else 0.0)
    return out


def test_generated_tokens_on_held_out_prompts_beat_an_untrained_model(trained_run, bpe_tokenizer):
    model, tok = load_any(trained_run)
    held_out = [it for it in synthetic_items(40, seed=0, m=16, d=32, start=10**6) if it["group"] == "generation"]
    assert len(held_out) >= 10
    train_ids = {it["id"] for it in synthetic_items(3000, m=16, d=32)}
    assert not train_ids & {it["id"] for it in held_out}
    trained = _cosines(model, tok, held_out, force=False)  # must emit <image_start> on its own
    torch.manual_seed(0)
    untrained_model, _ = build_model(
        ModelConfig(tokenizer=bpe_tokenizer, chat_template="chatml", vision_dim=32, num_visual_tokens=16)
    )
    untrained = _cosines(untrained_model.eval(), tok, held_out, force=True)  # forced: its best chance
    assert np.mean(trained) > np.mean(untrained) + 0.3, (np.mean(trained), np.mean(untrained))
    assert np.mean(trained) > 0.4
