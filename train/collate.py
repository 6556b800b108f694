"""Collation: a rank's list of mixture items -> one packed batch of token rows.

Samples are packed greedily, in stream order, into rows of at most `max_len` tokens. Each
sample's position ids restart at 0, which is what confines attention to the sample:
transformers turns reset position ids into a block-diagonal causal mask (and flash-attention
into varlen kernels). The first position of every sample gets no label, so nothing is
predicted across a boundary. Padding at the end of a row is a segment of its own.

A sample longer than `max_len` is cut at `max_len`, moved back to before the `<image_start>`
of a visual block the cut would split (a block is kept whole or not at all); a sample left
with nothing to learn, or any overlong one under `overflow="drop"`, is dropped. Both are
counted in the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch

from vpit.errors import ConfigError
from vpit.model.chat_template import IGNORE, VISUAL_SLOT, ChatTemplate, Encoded, ImageTokens, encode_messages
from vpit.records import StreamItem

__all__ = ["Collator", "PackedBatch", "pack", "truncate"]


@dataclasses.dataclass
class PackedBatch:
    """Rows of packed samples, plus what the trainer logs about them."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    vision_target: torch.Tensor
    position_ids: torch.Tensor
    visual_tokens: torch.Tensor
    sample_ids: list[str]
    """Ids of the samples kept, in packed order."""
    n_tokens: int
    """Tokens that are not padding."""
    n_text: int = 0
    """Text targets (positions with a label), the denominator of the text loss."""
    n_vision: int = 0
    """Visual targets, the denominator of the vision loss."""
    spans: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    """(row, start, end) of each kept sample, aligned with sample_ids."""
    sources: list[str] = dataclasses.field(default_factory=list)
    """The source of each kept sample, aligned with sample_ids."""
    truncated: int = 0
    dropped: int = 0
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Items the loader could not read ({"index", "id", "source", "error"}): left out, logged, budgeted."""

    @property
    def padded_tokens(self) -> int:
        """Positions in the rows, padding included (what the forward pass computes)."""
        return int(self.input_ids.numel())

    def model_inputs(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, Any]:
        vis = self.visual_tokens.to(device)
        return {
            "input_ids": self.input_ids.to(device),
            "labels": self.labels.to(device),
            "vision_target": self.vision_target.to(device),
            "position_ids": self.position_ids.to(device),
            "visual_tokens": vis.to(dtype) if dtype is not None else vis,
        }


def truncate(enc: Encoded, visual: np.ndarray, max_len: int, m: int) -> tuple[Encoded, np.ndarray] | None:
    """Cut `enc` to at most `max_len` tokens without splitting a visual block; None if
    nothing trainable is left."""
    cut = max_len
    slot_pos = np.flatnonzero(enc.input_ids == VISUAL_SLOT).reshape(-1, m) if m else np.zeros((0, 0), int)
    kept_blocks = 0
    for b in range(len(slot_pos)):
        start, end = slot_pos[b, 0] - 1, slot_pos[b, -1] + 1  # <image_start> ... <image_end>
        if end < cut:
            kept_blocks += 1
        else:
            cut = min(cut, start)
            break
    out = Encoded(
        input_ids=enc.input_ids[:cut],
        labels=enc.labels[:cut],
        vision_target=enc.vision_target[:cut],
        image_of_slot=enc.image_of_slot[:cut],
        images=enc.images[:kept_blocks],
    )
    if (out.labels[1:] == IGNORE).all() and not out.vision_target[1:].any():
        return None
    return out, visual[: kept_blocks * m]


def pack(
    samples: list[tuple[str, Encoded, np.ndarray]],
    max_len: int,
    pad_id: int,
    truncated: int = 0,
    dropped: int = 0,
    sources: list[str] | None = None,
) -> PackedBatch:
    """Greedy in-order packing of (id, encoded, visual (slots, d)) into rows of <= max_len."""
    rows: list[list[int]] = [[]]
    lengths = [0]
    for k, (_, enc, _) in enumerate(samples):
        if lengths[-1] + len(enc) > max_len and rows[-1]:
            rows.append([])
            lengths.append(0)
        rows[-1].append(k)
        lengths[-1] += len(enc)
    width = max(lengths) if samples else 1
    shape = (len(rows), width)
    ids = np.full(shape, pad_id, np.int64)
    labels = np.full(shape, IGNORE, np.int64)
    vis = np.zeros(shape, bool)
    pos = np.zeros(shape, np.int64)
    visual, order, spans = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            sid, enc, v = samples[k]
            n = len(enc)
            ids[r, at : at + n], labels[r, at : at + n] = enc.input_ids, enc.labels
            vis[r, at : at + n], pos[r, at : at + n] = enc.vision_target, np.arange(n)
            labels[r, at], vis[r, at] = IGNORE, False  # never predict across a sample boundary
            visual.append(v)
            order.append(sid)
            spans.append((r, at, at + n))
            at += n
        pos[r, at:] = np.arange(width - at)  # padding: a segment of its own
    d = samples[0][2].shape[-1] if samples else 0
    visual_arr = np.concatenate(visual).astype(np.float32) if visual else np.zeros((0, d), np.float32)
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        vision_target=torch.from_numpy(vis),
        position_ids=torch.from_numpy(pos),
        visual_tokens=torch.from_numpy(visual_arr),
        sample_ids=order,
        n_tokens=int(sum(lengths)),
        n_text=int((labels[:, 1:] != IGNORE).sum()),
        n_vision=int(vis[:, 1:].sum()),
        spans=spans,
        sources=list(sources) if sources is not None else [""] * len(order),
        truncated=truncated,
        dropped=dropped,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Collator:
    """Turns one rank's list of mixture items into a PackedBatch (runs in loader workers)."""

    tokenizer: Any
    template: ChatTemplate
    image: ImageTokens
    vision_dim: int
    max_len: int
    overflow: Literal["truncate", "drop"] = "truncate"

    def __post_init__(self):
        if self.max_len < 8:
            raise ConfigError(f"max_len: expected >= 8, got {self.max_len}")
        if self.overflow not in ("truncate", "drop"):
            raise ConfigError(f"overflow: expected 'truncate' or 'drop', got {self.overflow!r}")

    def encode(self, item: StreamItem) -> tuple[Encoded, np.ndarray]:
        """One item -> its tokens and the visual token of each slot, checked against the model."""
        enc = encode_messages(item["record"]["messages"], self.tokenizer, self.template, self.image)
        tokens = item.get("tokens")
        m, d = self.image.m, self.vision_dim
        if enc.images:
            if tokens is None or tokens.ndim != 3 or tokens.shape[1:] != (m, d):
                got = None if tokens is None else tuple(tokens.shape)
                raise ConfigError(f"sample {item['id']}: tokens: expected shape (n_images, {m}, {d}), got {got}")
            if max(enc.images) >= len(tokens):
                raise ConfigError(
                    f"sample {item['id']}: messages name image {max(enc.images)} "
                    f"but only {len(tokens)} token arrays came with it"
                )
            visual = np.asarray(tokens, np.float32)[enc.images].reshape(-1, d)
        else:
            visual = np.zeros((0, d), np.float32)
        return enc, visual

    def __call__(self, items: list[StreamItem]) -> PackedBatch:
        kept, sources, truncated, dropped = [], [], 0, 0
        skipped = [
            {"index": it["index"], "id": it["id"], "source": it["source"], "error": it["skipped"]}
            for it in items
            if "skipped" in it
        ]
        for item in items:
            if "skipped" in item:
                continue
            enc, visual = self.encode(item)
            if len(enc) > self.max_len:
                cut = truncate(enc, visual, self.max_len, self.image.m) if self.overflow == "truncate" else None
                if cut is None:
                    dropped += 1
                    continue
                truncated += 1
                enc, visual = cut
            kept.append((item["id"], enc, visual))
            sources.append(item["source"])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = pack(kept, self.max_len, pad, truncated, dropped, sources)
        batch.skipped = skipped
        return batch

    def step(self, items: list[StreamItem], micro_batches: int) -> list[PackedBatch]:
        """One optimizer step's items of this rank -> one packed batch per micro step (item["micro"])."""
        return [self([it for it in items if it.get("micro", 0) == j]) for j in range(micro_batches)]
