"""Generation follows the template: evaluation asks for the image where training put it, after
the assistant's own words, and reports how often the model starts an image by itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpit.model.build import ModelConfig, build_model
from vpit.model.chat_template import ImageTokens, encode_messages, get_template
from vpit.train import evaluate as ev
from vpit.train.synthetic import synthetic_items


@pytest.fixture(scope="module")
def tiny(bpe_tokenizer):
    torch.manual_seed(0)
    model, tok = build_model(
        ModelConfig(llm="tiny", tokenizer=bpe_tokenizer, chat_template="chatml", vision_dim=32, num_visual_tokens=16)
    )
    return model.eval(), tok


def test_the_image_is_asked_for_after_the_assistants_words_as_in_training(tiny, monkeypatch):
    model, tok = tiny
    item = next(it for it in synthetic_items(20, m=16, d=32) if it["record"]["kind"] == "generation")
    seen = []
    real = ev.generate

    def spy(model, ids, vis, **kw):
        seen.append((ids[0].tolist(), kw.get("force_image", False)))
        return real(model, ids, vis, **kw)

    monkeypatch.setattr(ev, "generate", spy)
    results = ev.score_items(model, tok, [], [item])
    cfg = model.config
    trained = encode_messages(
        item["record"]["messages"],
        tok,
        get_template(cfg.chat_template),
        ImageTokens(cfg.image_start_id, cfg.image_end_id, cfg.num_visual_tokens),
    )
    start = int(np.flatnonzero(trained.input_ids == cfg.image_start_id)[0])
    forced = [ids for ids, force in seen if force]
    # today's code forced <image_start> straight after the assistant header: these ids fall short
    # of the training sequence by "Here is an image based on your request:"
    assert forced == [trained.input_ids[:start].tolist()]
    words = tok.decode(forced[0][-12:])
    assert "based on your request:" in words
    # the free pass: the bare prompt, ending at the assistant header, with no image forced
    free = [ids for ids, force in seen if not force]
    assert len(free) == 1 and len(free[0]) < len(forced[0])
    assert isinstance(results[0]["free_image"], bool)


def test_free_generation_rate_and_judge_metrics_are_reported(tiny):
    from vpit.judge import METRICS, TokenJudge
    from vpit.model.encoder import EncoderConfig, tiny_encoder

    model, tok = tiny
    items = [it for it in synthetic_items(24, m=16, d=32) if it["record"]["kind"] == "generation"][:4]
    metrics = ev.evaluate_items(model, tok, items, suite=("generation",))
    assert 0.0 <= metrics["generation/free_rate"] <= 1.0 and metrics["n_generation"] == 4
    assert "generation/judge/background" not in metrics  # no judge given
    judge = TokenJudge(tiny_encoder(EncoderConfig(encoder="tiny", tokens=16)).encode)
    metrics = ev.evaluate_items(model, tok, items, suite=("generation",), judge=judge)
    assert metrics["n_judged"] == 4
    for key in METRICS:
        assert 0.0 <= metrics[f"generation/judge/{key}"] <= 1.0
        assert 0.0 < metrics[f"generation/judge/{key}/chance"] < 0.5
