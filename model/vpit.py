"""The VPiT model: any Hugging Face causal LM + input projector + vision head.

Following MetaMorph: visual tokens (cached, L2-normalised SigLIP features) enter through an
`mlp2x_gelu` projector (vision dim -> LLM dim -> LLM dim); a vision head (Linear, GELU,
Linear) maps the hidden state at t-1 to a prediction of visual token t, L2-normalised and
scored with a cosine loss; text gets cross-entropy on assistant tokens only, and
`loss = text + vision_coef * vision`. No DeepSpeed here (that is train/parallelize.py).

Every submodule runs on every call, even when a batch holds no image or no target: under
ZeRO-3 each module call gathers its parameters collectively, so ranks must call the same
modules in the same order or they deadlock.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from vpit.errors import ConfigError

__all__ = ["VPiTConfig", "VPiTModel", "VPiTOutput", "init_new_embeddings_to_mean", "make_mlps", "set_rows_to_mean"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VPiTConfig:
    vision_dim: int
    """Width d of a cached visual token (1152 for SigLIP so400m)."""
    num_visual_tokens: int
    """m, visual tokens per image (64 in MetaMorph)."""
    image_start_id: int
    """Id of <image_start>, looked up from the tokenizer."""
    image_end_id: int
    """Id of <image_end>, looked up from the tokenizer."""
    vision_coef: float = 1.0
    """Weight of the vision (cosine) loss in the total loss."""
    chat_template: str = "llama3"
    """Chat template family (model/chat_template.py)."""

    def __post_init__(self):
        for name in ("vision_dim", "num_visual_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.vision_coef < 0:
            raise ConfigError(f"model.vision_coef: expected >= 0, got {self.vision_coef}")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "VPiTConfig":
        return cls(**json.loads(Path(path).read_text()))


@dataclasses.dataclass
class VPiTOutput(ModelOutput):
    # A ModelOutput (a dict) so that ZeRO-3's hooks can see the tensors it carries.
    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    vision_loss: torch.Tensor | None = None
    text_sum: torch.Tensor | None = None
    """Summed CE over the text targets: the trainer normalises by the whole global batch's count."""
    vision_sum: torch.Tensor | None = None
    """Summed cosine loss over the visual targets."""
    n_text: int | None = None
    n_vision: int | None = None
    text_token_loss: torch.Tensor | None = None
    """(B, T) per-position CE (0 where untrained), position t scoring the token at t."""
    vision_token_loss: torch.Tensor | None = None
    """(B, T) per-position cosine loss (0 where not a target)."""


def init_new_embeddings_to_mean(
    llm: nn.Module,
    new_ids: list[int],
    n_old: int,
    gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
) -> None:
    """Set the embedding rows of `new_ids` (and untied output rows) to the mean of the first
    `n_old` rows. `gather` lets a sharded trainer materialise the weights (ZeRO-3)."""
    mats = [llm.get_input_embeddings().weight]
    out = llm.get_output_embeddings()
    if out is not None and out.weight is not mats[0]:
        mats.append(out.weight)
    with gather(mats) if gather else nullcontext(), torch.no_grad():
        for w in mats:
            if w.numel() == 0:  # not the modifying rank under ZeRO-3
                continue
            set_rows_to_mean(w, new_ids, n_old)


def set_rows_to_mean(weight: torch.Tensor, new_ids: list[int], n_old: int) -> None:
    """Rows `new_ids` of an embedding matrix := the mean of its first `n_old` rows (those of
    `new_ids` among them left out)."""
    left_out = [i for i in new_ids if i < n_old]
    # sums, not a masked copy: the embedding is the largest tensor a sharded build holds whole
    total = weight[:n_old].sum(0) - (weight[left_out].sum(0) if left_out else 0)
    weight[new_ids] = total / (n_old - len(left_out))


def _cache_argument(module: nn.Module) -> str:
    """The name the installed transformers gives the KV-cache argument: `cache` from 5.x on,
    `past_key_values` before (5.x still takes it, with a warning at every call)."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def make_mlps(config: VPiTConfig, hidden: int, dtype: torch.dtype | None = None) -> tuple[nn.Module, nn.Module]:
    """(input projector, vision head): MetaMorph's mlp2x_gelu (d -> h -> h) and Linear-GELU-Linear
    (h -> h -> d). Separate from VPiTModel so a sharded trainer can create them already sharded."""
    projector = _mlp(config.vision_dim, hidden, hidden)
    head = _mlp(hidden, hidden, config.vision_dim)
    return (projector.to(dtype), head.to(dtype)) if dtype is not None else (projector, head)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class VPiTModel(nn.Module):
    """A causal LM that reads and predicts continuous visual tokens.

    Args:
        llm: a Hugging Face causal LM whose vocabulary already holds the image delimiters.
        config: the VPiT settings (dims, delimiter ids, loss weight).
    """

    def __init__(
        self,
        llm: nn.Module,
        config: VPiTConfig,
        projector: nn.Module | None = None,
        vision_head: nn.Module | None = None,
    ):
        super().__init__()
        self.config = config
        self.llm = llm
        if projector is None or vision_head is None:
            projector, vision_head = make_mlps(config, llm.config.hidden_size)
        self.projector, self.vision_head = projector, vision_head

    # -- pieces shared by training and generation ---------------------------------------
    def embed(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings, with visual slots (ids < 0) replaced, in row-major order, by
        the projected `visual_tokens` (N_slots, d)."""
        slots = input_ids < 0
        embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        proj = self.projector(visual_tokens.to(embeds.dtype))
        if proj.shape[0] != int(slots.sum()):
            raise ConfigError(f"visual_tokens: {proj.shape[0]} tokens for {int(slots.sum())} visual slots")
        return embeds.masked_scatter(slots.unsqueeze(-1), proj)

    def hidden(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> Any:
        """Run the decoder stack (no LM head). Reset `position_ids` confine attention to each
        packed sample: transformers builds the block-diagonal causal mask from them."""
        kwargs = {} if past_key_values is None else {_cache_argument(self.llm.base_model): past_key_values}
        return self.llm.base_model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=use_cache, **kwargs
        )

    def predict_visual(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states -> L2-normalised visual-token predictions."""
        return F.normalize(self.vision_head(h).float(), dim=-1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.llm.get_output_embeddings()(h)

    # -- training ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        vision_target: torch.Tensor,
        visual_tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        return_token_losses: bool = False,
    ) -> VPiTOutput:
        """Losses for a (packed) batch.

        Args:
            input_ids: (B, T), VISUAL_SLOT (< 0) at visual slots.
            labels: (B, T) text target of each position, -100 where untrained.
            vision_target: (B, T) bool, slots whose visual token is a target.
            visual_tokens: (N_slots, d) the cached token of every slot, row-major.
            position_ids: (B, T), restarting at 0 at every packed sample.
        """
        embeds = self.embed(input_ids, visual_tokens)
        h = self.hidden(embeds, position_ids).last_hidden_state
        h_prev = h[:, :-1]  # the state at t-1 predicts position t
        text_mask = labels[:, 1:] != -100
        vis_mask = vision_target[:, 1:]
        # Logits only where there is a label: the vocabulary (150k+) dominates memory otherwise.
        logits = self.logits(h_prev[text_mask])
        text_tok = F.cross_entropy(logits.float(), labels[:, 1:][text_mask], reduction="none")
        slot_index = (input_ids < 0).flatten().cumsum(0).view_as(input_ids) - 1
        target = F.normalize(visual_tokens[slot_index[:, 1:][vis_mask]].float(), dim=-1)
        vis_tok = 1.0 - (self.predict_visual(h_prev[vis_mask]) * target).sum(-1)
        n_text, n_vis = int(text_tok.numel()), int(vis_tok.numel())
        text_sum, vision_sum = text_tok.sum(), vis_tok.sum()
        text_loss = text_sum / max(n_text, 1)
        vision_loss = vision_sum / max(n_vis, 1)
        out = VPiTOutput(
            loss=text_loss + self.config.vision_coef * vision_loss,
            text_loss=text_loss,
            vision_loss=vision_loss,
            text_sum=text_sum,
            vision_sum=vision_sum,
            n_text=n_text,
            n_vision=n_vis,
        )
        if return_token_losses:
            pad = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
            out.text_token_loss = torch.zeros(input_ids.shape, dtype=torch.float32, device=h.device).masked_scatter(
                torch.cat([pad, text_mask], 1), text_tok
            )
            out.vision_token_loss = torch.zeros(input_ids.shape, dtype=torch.float32, device=h.device).masked_scatter(
                torch.cat([pad, vis_mask], 1), vis_tok
            )
        return out
