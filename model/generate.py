"""Generation: text, and when the model emits `<image_start>`, m visual tokens.

Each visual token is predicted by the vision head (L2-normalised) and fed back through the
input projector as the next input, exactly as cached tokens enter during training; after m
tokens `<image_end>` is appended and text generation goes on. With `use_cache=True` every
step runs one new position against the KV cache (transformers' DynamicCache); with
`use_cache=False` the whole sequence is recomputed at every step, as MetaMorph's reference
code does. Both give the same result; the cached one is O(n) instead of O(n^2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpit.errors import ConfigError
from vpit.model.chat_template import ImageTokens, encode_messages, get_template
from vpit.model.vpit import VPiTModel

__all__ = ["Generation", "encode_for_image", "encode_prompt", "generate", "render_generation", "save_images"]


@dataclasses.dataclass
class Generation:
    token_ids: list[int]
    """Generated ids; each image shows as <image_start>, m VISUAL_SLOT (-1) ids, <image_end>."""
    images: list[np.ndarray]
    """One (m, d) float32 array per generated image."""
    text: str = ""


class _Runner:
    """Feeds embeddings to the decoder, incrementally (KV cache) or by recomputation."""

    def __init__(self, model: VPiTModel, use_cache: bool):
        from transformers import DynamicCache

        self.model, self.use_cache = model, use_cache
        self.cache = DynamicCache(config=model.llm.config) if use_cache else None
        self.seen: list[torch.Tensor] = []

    def feed(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append (1, k, D) embeddings; return the last hidden state (1, D)."""
        if self.use_cache:
            out = self.model.hidden(embeds, past_key_values=self.cache, use_cache=True)
        else:
            self.seen.append(embeds)
            out = self.model.hidden(torch.cat(self.seen, 1))
        return out.last_hidden_state[:, -1]


def encode_prompt(
    model: VPiTModel, tokenizer: Any, messages: list[dict[str, Any]], input_tokens: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A user conversation (sample format) -> (input ids (1, T), visual tokens (slots, d))."""
    cfg = model.config
    image = ImageTokens(cfg.image_start_id, cfg.image_end_id, cfg.num_visual_tokens)
    enc = encode_messages(messages, tokenizer, get_template(cfg.chat_template), image, add_generation_prompt=True)
    if enc.images:
        if input_tokens is None:
            raise ConfigError("the prompt names an image but no input tokens were given")
        visual = np.asarray(input_tokens, np.float32)[enc.images].reshape(-1, cfg.vision_dim)
    else:
        visual = np.zeros((0, cfg.vision_dim), np.float32)
    return torch.from_numpy(enc.input_ids)[None], torch.from_numpy(visual)


def encode_for_image(
    model: VPiTModel,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    target: int,
    input_tokens: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversation exactly as training encodes it, cut just before the `<image_start>` of the
    assistant's image `target`: the prompt, the assistant header and the assistant's text before
    the image ("Here is an image based on your request:"), teacher-forced. Generating from here
    with `force_image` asks for the image where training put it. Returns (ids (1, T), the visual
    tokens of the input images before the cut (slots, d))."""
    from vpit.model.chat_template import VISUAL_SLOT

    cfg = model.config
    image = ImageTokens(cfg.image_start_id, cfg.image_end_id, cfg.num_visual_tokens)
    enc = encode_messages(messages, tokenizer, get_template(cfg.chat_template), image)
    slots = np.flatnonzero(enc.vision_target & (enc.image_of_slot == target))
    if not len(slots):
        raise ConfigError(f"image {target} is not a target of an assistant turn of these messages")
    cut = int(slots[0]) - 1  # the <image_start> before the target's first slot
    before = [i for i in enc.images[: int(np.sum(enc.input_ids[:cut] == VISUAL_SLOT)) // cfg.num_visual_tokens]]
    if before:
        if input_tokens is None:
            raise ConfigError("the conversation has input images before the target but no input tokens were given")
        visual = np.asarray(input_tokens, np.float32)[before].reshape(-1, cfg.vision_dim)
    else:
        visual = np.zeros((0, cfg.vision_dim), np.float32)
    return torch.from_numpy(enc.input_ids[:cut])[None], torch.from_numpy(visual)


@torch.no_grad()
def generate(
    model: VPiTModel,
    input_ids: torch.Tensor,
    visual_tokens: torch.Tensor,
    max_new_tokens: int = 128,
    stop_ids: tuple[int, ...] = (),
    use_cache: bool = True,
    force_image: bool = False,
    lockstep: bool = False,
) -> Generation:
    """Greedy generation from a prompt of ids (1, T) and its input visual tokens.

    `force_image` starts an image right away (as if the model had emitted <image_start>): the
    way to ask for exactly one image. With `lockstep`, every step runs every module (LM head,
    vision head, token embedding, projector, decoder) and generation goes on past a stop token
    to exactly `max_new_tokens` steps; the output is the same, cut at the stop. Under ZeRO-3 each
    module call is a collective, so ranks generating different things must make the same calls.
    """
    cfg = model.config
    dev = next(model.parameters()).device
    embed_tok = model.llm.get_input_embeddings()
    run = _Runner(model, use_cache)
    h = run.feed(model.embed(input_ids.to(dev), visual_tokens.to(dev)))
    ids: list[int] = []
    images: list[np.ndarray] = []
    preds: list[torch.Tensor] = []  # the visual tokens of the image being generated
    pending: int | None = cfg.image_start_id if force_image else None
    stopped = False
    for _ in range(max_new_tokens):
        in_image = bool(ids) and ids[-1] in (cfg.image_start_id, -1) and len(preds) < cfg.num_visual_tokens
        logits = model.logits(h) if lockstep or not (in_image or pending is not None) else None
        pred = model.predict_visual(h) if lockstep or in_image else None
        if in_image:
            preds.append(pred)
            ids.append(-1)
            nxt_embed = model.projector(pred.to(h.dtype))[:, None]
            if lockstep:
                embed_tok(torch.zeros((1, 1), dtype=torch.long, device=dev))
            if len(preds) == cfg.num_visual_tokens:
                images.append(torch.cat(preds).float().cpu().numpy())
                pending = cfg.image_end_id
        else:
            nxt = pending if pending is not None else int(logits.argmax(-1))
            pending = None
            ids.append(nxt)
            if nxt == cfg.image_start_id:
                preds = []
            nxt_embed = embed_tok(torch.tensor([[nxt]], device=dev))
            if lockstep:
                model.projector(pred.to(h.dtype))
            if nxt in stop_ids:
                stopped = True
                if not lockstep:
                    break
        h = run.feed(nxt_embed)
        if stopped and lockstep:
            continue
    if stopped:
        ids = ids[: next(k for k, t in enumerate(ids) if t in stop_ids) + 1]
        images = images[: sum(1 for t in ids if t == cfg.image_start_id)]
    return Generation(token_ids=ids, images=images)


def save_images(gen: Generation, out_dir: str | Path, stem: str = "image") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(gen.images):
        paths.append(out / f"{stem}-{i}.npy")
        np.save(paths[-1], arr)
    return paths


def render_generation(gen: Generation, tokenizer: Any, paths: list[Path] | None = None) -> str:
    """The generated text with each image shown as [image i: m x d -> path]."""
    out, text, k = [], [], 0
    ids = gen.token_ids
    i = 0
    while i < len(ids):
        if ids[i] == -1:
            out.append(tokenizer.decode(text))
            text = []
            n = 0
            while i < len(ids) and ids[i] == -1:
                i, n = i + 1, n + 1
            where = f" -> {paths[k]}" if paths and k < len(paths) else ""
            out.append(f"[image {k}: {n} x {gen.images[k].shape[-1]} tokens{where}]")
            k += 1
            continue
        text.append(ids[i])
        i += 1
    out.append(tokenizer.decode(text))
    return "".join(out)
