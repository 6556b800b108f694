"""The VPiT model with the real Qwen2.5 tokenizer: template, loss masks, packing, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpit.model.build import ModelConfig, build_model
from vpit.model.chat_template import IGNORE, VISUAL_SLOT, ImageTokens, encode_messages, get_template
from vpit.model.generate import encode_prompt, generate
from vpit.train.collate import Collator, truncate
from vpit.train.synthetic import synthetic_items

M, D = 16, 32


@pytest.fixture(scope="module")
def vpit():
    torch.manual_seed(0)
    model, tok = build_model(
        ModelConfig(tokenizer="qwen2.5", chat_template="chatml", vision_dim=D, num_visual_tokens=M)
    )
    return model.eval(), tok


def _collator(model, tok, max_len=400, overflow="truncate"):
    c = model.config
    return Collator(tok, get_template("chatml"), ImageTokens(c.image_start_id, c.image_end_id, M), D, max_len, overflow)


def _editing_item(i: int, rng: np.random.Generator) -> dict:
    """Two images: one input (user), one target (assistant)."""
    tokens = rng.standard_normal((2, M, D)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    record = {
        "id": f"edit:{i}",
        "messages": [
            {"role": "system", "content": [{"text": "You edit pictures."}]},
            {"role": "user", "content": [{"image": 0}, {"text": "Make the circle blue."}]},
            {"role": "assistant", "content": [{"text": "Done:"}, {"image": 1}, {"text": "Anything else?"}]},
        ],
    }
    return {"index": i, "id": record["id"], "source": "edit", "group": "editing", "record": record, "tokens": tokens}


def test_image_tokens_are_looked_up_and_start_at_the_mean(vpit):
    model, tok = vpit
    c = model.config
    assert tok.convert_ids_to_tokens([c.image_start_id, c.image_end_id]) == ["<image_start>", "<image_end>"]
    assert c.image_start_id >= 151643  # after the real Qwen2.5 vocabulary, not a hard-coded id
    w = model.llm.get_input_embeddings().weight
    mean = w[: c.image_start_id].mean(0)
    torch.testing.assert_close(w[c.image_start_id], mean)
    torch.testing.assert_close(w[c.image_end_id], mean)


def test_template_trains_assistant_content_only_and_images_by_role(vpit):
    model, tok = vpit
    c = model.config
    item = _editing_item(0, np.random.default_rng(0))
    enc = encode_messages(
        item["record"]["messages"], tok, get_template("chatml"), ImageTokens(c.image_start_id, c.image_end_id, M)
    )
    trained = tok.decode([int(i) for i in enc.labels if i != IGNORE])
    assert trained == "Done:<image_start><image_end>Anything else?<|im_end|>"
    slots = enc.input_ids == VISUAL_SLOT
    assert slots.sum() == 2 * M and enc.images == [0, 1]
    # the user's image is input only, the assistant's image is the target
    assert (enc.image_of_slot[enc.vision_target] == 1).all() and enc.vision_target.sum() == M
    assert tok.decode([int(i) for i in enc.input_ids[~slots]]).startswith("<|im_start|>system\nYou edit pictures.")


def test_packed_batch_loss_equals_per_sample_losses(vpit):
    model, tok = vpit
    rng = np.random.default_rng(1)
    items = synthetic_items(7, seed=3, m=M, d=D) + [_editing_item(9, rng)]
    col = _collator(model, tok, max_len=220)
    packed = col(items)
    assert packed.input_ids.shape[0] < len(items)  # really packed: several samples share rows
    with torch.no_grad():
        out = model(**packed.model_inputs(), return_token_losses=True)
        singles = [model(**col([it]).model_inputs(), return_token_losses=True) for it in items]
    # walk the rows: each sample's per-position losses must equal its own run's
    at = {}
    for r in range(packed.input_ids.shape[0]):
        starts = (packed.position_ids[r] == 0).nonzero().flatten().tolist()
        for s in starts:
            at.setdefault("list", []).append((r, s))
    for single, (r, s) in zip(singles, at["list"]):
        n = single.text_token_loss.shape[1]
        torch.testing.assert_close(out.text_token_loss[r, s : s + n], single.text_token_loss[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.vision_token_loss[r, s : s + n], single.vision_token_loss[0], atol=1e-5, rtol=0)
    n_text = sum(s.n_text for s in singles)
    text = sum(s.text_loss.item() * s.n_text for s in singles) / n_text
    vision = sum(s.vision_loss.item() * s.n_vision for s in singles) / sum(s.n_vision for s in singles)
    assert out.n_text == n_text
    assert abs(out.text_loss.item() - text) < 1e-5 and abs(out.vision_loss.item() - vision) < 1e-5
    assert out.vision_loss.item() > 0 and out.text_loss.item() > 0


def test_truncation_keeps_visual_blocks_whole_and_counts(vpit):
    model, tok = vpit
    item = _editing_item(0, np.random.default_rng(0))
    col = _collator(model, tok)
    enc, visual = col.encode(item)
    slot_pos = np.flatnonzero(enc.input_ids == VISUAL_SLOT)
    second_block = slot_pos[M]  # first slot of the assistant image
    cut = truncate(enc, visual, int(second_block + 3), M)  # a cut inside the target block
    assert cut is not None
    short, vis = cut
    assert len(short) == second_block - 1  # cut before that block's <image_start>
    assert short.images == [0] and vis.shape == (M, D) and (short.input_ids == VISUAL_SLOT).sum() == M
    assert "Done:" in tok.decode([int(i) for i in short.labels if i != IGNORE])
    # a cut that leaves nothing trainable drops the sample
    assert truncate(enc, visual, int(slot_pos[0] + 2), M) is None
    batch = _collator(model, tok, max_len=int(second_block + 3))([item, synthetic_items(1, m=M, d=D)[0]])
    assert (batch.truncated, batch.dropped) == (1, 0)
    assert batch.visual_tokens.shape[0] == int((batch.input_ids == VISUAL_SLOT).sum())
    assert (_collator(model, tok, max_len=int(second_block + 3), overflow="drop")([item]).dropped) == 1


def test_kv_cache_generation_equals_recomputation(vpit):
    model, tok = vpit
    ids, vis = encode_prompt(model, tok, [{"role": "user", "content": [{"text": "Generate an image of a red circle"}]}])
    cached = generate(model, ids, vis, max_new_tokens=2 * M + 8, force_image=True, use_cache=True)
    full = generate(model, ids, vis, max_new_tokens=2 * M + 8, force_image=True, use_cache=False)
    assert cached.token_ids == full.token_ids
    assert len(cached.images) >= 1 and cached.images[0].shape == (M, D)
    for a, b in zip(cached.images, full.images):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(cached.images[0], axis=-1), 1.0, atol=1e-5)
    # with an input image in the prompt (editing), too
    item = _editing_item(1, np.random.default_rng(2))
    ids, vis = encode_prompt(model, tok, item["record"]["messages"][:2], item["tokens"])
    a = generate(model, ids, vis, max_new_tokens=M + 4, force_image=True)
    b = generate(model, ids, vis, max_new_tokens=M + 4, force_image=True, use_cache=False)
    np.testing.assert_allclose(a.images[0], b.images[0], atol=1e-5, rtol=0)
