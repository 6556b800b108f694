"""Chat templates, one per LLM family, and the one function that turns a record into tokens.

A template renders a conversation of the sample format (messages whose content is a list of
{"text"} / {"image": i} parts) into token ids, with every image as
`<image_start>` + m visual-token slots + `<image_end>`. Training (collation) and generation
(prompts) both go through `encode_messages`, so what the model sees at test time is exactly
what it was trained on.

We render segment by segment instead of calling the tokenizer's Jinja chat template: the
loss mask (assistant content only) and the visual slots need token-exact boundaries, which a
rendered string does not give back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vpit.errors import ConfigError

__all__ = [
    "TEMPLATES",
    "VISUAL_SLOT",
    "ChatTemplate",
    "Encoded",
    "ImageTokens",
    "encode_messages",
    "get_template",
    "stop_ids",
]

# Input id written at every visual-token slot; the model replaces its embedding by the
# projected visual token. Negative so it can never collide with a real vocabulary id.
VISUAL_SLOT = -1
IGNORE = -100


@dataclasses.dataclass(frozen=True, slots=True)
class ChatTemplate:
    """How one LLM family frames turns. Strings are tokenized as text (special tokens of the
    family's tokenizer come out as single ids)."""

    name: str
    begin: str
    """Written once before the first turn (e.g. Llama-3's <|begin_of_text|>)."""
    header: str
    """Opens a turn; `{role}` is replaced by the role. Never trained."""
    end: str
    """Closes a turn. Trained in assistant turns, so the model learns to stop."""
    after_end: str = ""
    """Written after `end` (untrained), e.g. ChatML's newline."""
    part_sep: str = "\n"
    """Between two adjacent text parts of one message."""


TEMPLATES = {
    "llama3": ChatTemplate(
        name="llama3",
        begin="<|begin_of_text|>",
        header="<|start_header_id|>{role}<|end_header_id|>\n\n",
        end="<|eot_id|>",
    ),
    "chatml": ChatTemplate(name="chatml", begin="", header="<|im_start|>{role}\n", end="<|im_end|>", after_end="\n"),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"chat_template: unknown template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def stop_ids(tokenizer: Any, template: ChatTemplate) -> tuple[int, ...]:
    """Ids that end a generated turn: the template's turn end (when it is one token) and EOS."""
    end = tokenizer.encode(template.end, add_special_tokens=False)
    ids = {tokenizer.eos_token_id} | ({end[0]} if len(end) == 1 else set())
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))


@dataclasses.dataclass(frozen=True, slots=True)
class ImageTokens:
    """The ids of the image delimiters (looked up from the tokenizer) and m, tokens per image."""

    start_id: int
    end_id: int
    m: int


@dataclasses.dataclass(slots=True)
class Encoded:
    """One conversation as token arrays of equal length L.

    `input_ids` holds VISUAL_SLOT at visual slots; `labels` is the text target of each
    position (IGNORE where untrained); `vision_target` marks slots whose visual token is a
    prediction target (images in assistant turns); `image_of_slot` names the image (record
    index) each slot belongs to, -1 elsewhere.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    vision_target: np.ndarray
    image_of_slot: np.ndarray
    images: list[int]
    """Record image indices in order of appearance (one block each)."""

    def __len__(self) -> int:
        return len(self.input_ids)


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def encode_messages(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    template: ChatTemplate,
    image: ImageTokens,
    add_generation_prompt: bool = False,
) -> Encoded:
    """Tokenize `messages` (sample format) with `template`. Loss only on assistant content.

    With `add_generation_prompt`, the assistant header is appended (untrained) for generation.
    """
    ids: list[int] = []
    labels: list[int] = []
    vis: list[bool] = []
    img: list[int] = []
    images: list[int] = []

    def add(tokens: list[int], train: bool, slot_image: int = -1, target: bool = False) -> None:
        ids.extend(tokens)
        labels.extend(tokens if train else [IGNORE] * len(tokens))
        vis.extend([target] * len(tokens))
        img.extend([slot_image] * len(tokens))

    add(_text_ids(tokenizer, template.begin), False)
    for t, msg in enumerate(messages):
        role, train = msg["role"], msg["role"] == "assistant"
        add(_text_ids(tokenizer, template.header.format(role=role)), False)
        prev_text = False
        for p, part in enumerate(msg["content"]):
            if "text" in part:
                add(_text_ids(tokenizer, (template.part_sep if prev_text else "") + part["text"]), train)
                prev_text = True
            elif "image" in part:
                i = int(part["image"])
                images.append(i)
                # <image_start> is trained in assistant turns: generation starts when the model emits it.
                add([image.start_id], train)
                ids.extend([VISUAL_SLOT] * image.m)
                labels.extend([IGNORE] * image.m)
                vis.extend([train] * image.m)
                img.extend([i] * image.m)
                add([image.end_id], train)
                prev_text = False
            else:
                raise ConfigError(f"messages[{t}].content[{p}]: expected a 'text' or 'image' part, got {sorted(part)}")
        add(_text_ids(tokenizer, template.end), train)
        add(_text_ids(tokenizer, template.after_end), False)
    if add_generation_prompt:
        add(_text_ids(tokenizer, template.header.format(role="assistant")), False)
    return Encoded(
        input_ids=np.asarray(ids, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        vision_target=np.asarray(vis, dtype=bool),
        image_of_slot=np.asarray(img, dtype=np.int64),
        images=images,
    )
