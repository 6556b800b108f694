"""model/sharded_load.py: the checkpoint reader (here with partitioning left out, against
transformers' own load; with DeepSpeed at world size 2 in tests/train/zero_probe.py), and writes
into partitions: a rank writes only its slice of the flattened parameter, and rows that straddle
two ranks' slices land whole. The simulated layout is DeepSpeed's (equal slices of the flattened
parameter, the last one padded)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vpit.model.sharded_load as sharded_load
from vpit.errors import ConfigError
from vpit.model.sharded_load import load_pretrained_sharded, write_rows, write_whole
from vpit.model.vpit import set_rows_to_mean

VOCAB, NEW = 50, [50, 51]


def _save_llm(folder, tie: bool, **save) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, **save)


def _load(folder):
    return load_pretrained_sharded(
        folder,
        {"dtype": torch.float32},
        lambda module: None,  # partitioning left out: the parameters stay whole
        torch.device("cpu"),
        VOCAB + len(NEW),
        VOCAB,
        lambda w: set_rows_to_mean(w, NEW, VOCAB),
    )


def _reference(folder) -> nn.Module:
    """What the plain build does: transformers' load, a resize, the mean rows."""
    from transformers import AutoModelForCausalLM

    from vpit.model.vpit import init_new_embeddings_to_mean

    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    llm.resize_token_embeddings(VOCAB + len(NEW), mean_resizing=False)
    with torch.no_grad():
        init_new_embeddings_to_mean(llm, NEW, VOCAB)
    return llm


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_reader_loads_what_transformers_loads(tmp_path, monkeypatch, tie):
    """bf16 file into an fp32 model, a checkpoint in two files (index), slices of 3 rows at a time,
    tied and untied output embeddings each grown by the new rows: every parameter and buffer as
    transformers loads it."""
    _save_llm(tmp_path, tie, max_shard_size="4KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(sharded_load, "_CHUNK", 48)  # 3 rows of 16
    got, want = _load(tmp_path), _reference(tmp_path)
    assert got is not None
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tie
    assert got.config.vocab_size == VOCAB + len(NEW)
    state, expected = got.state_dict(), want.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert got.generation_config is not None


def test_checkpoints_it_does_not_know_are_left_to_transformers(tmp_path):
    """An extra tensor (a fused or renamed weight), or a vocabulary smaller than the tokenizer's:
    None, so the caller loads through transformers."""
    extra, small = tmp_path / "extra", tmp_path / "small"
    _save_llm(extra, True)
    tensors = load_file(str(extra / "model.safetensors"))
    save_file({**tensors, "model.layers.0.mlp.gate_up_proj.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    assert _load(extra) is None
    _save_llm(small, True)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB - 5}))
    tensors = load_file(str(small / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][: VOCAB - 5].clone()
    save_file(tensors, str(small / "model.safetensors"))
    assert _load(small) is None


def test_a_tensor_of_another_shape_is_named(tmp_path):
    _save_llm(tmp_path, True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(25, 16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ConfigError, match=r"model.layers.1.mlp.up_proj.weight has shape \[25, 16\], the model \[24, 16\]"
    ):
        _load(tmp_path)


def _partitioned(shape: tuple[int, ...], ranks: int):
    """Per-rank buffers laid out as DeepSpeed partitions a parameter, and each rank's local_part."""
    numel = torch.Size(shape).numel()
    size = -(-numel // ranks)
    buffers = [torch.full((size,), float("nan")) for _ in range(ranks)]

    def local_part(rank: int):
        start = rank * size
        return lambda param: (buffers[rank].narrow(0, 0, max(0, min(size, numel - start))), start)

    def whole() -> torch.Tensor:
        return torch.cat(buffers)[:numel].reshape(shape)

    return local_part, whole


def test_rows_and_whole_values_land_in_every_ranks_slice():
    shape, ranks = (7, 5), 3  # slices of 12 elements: rows 2 and 4 straddle two ranks, the last is padded
    start = torch.arange(35, dtype=torch.float32).reshape(shape)
    rows = -torch.arange(15, dtype=torch.float32).reshape(3, 5)
    ids = [2, 4, 6]
    expected = start.clone()
    write_rows(nn.Parameter(expected, requires_grad=False), ids, rows, None)
    assert torch.equal(expected[ids], rows)

    local_part, whole = _partitioned(shape, ranks)
    param = nn.Parameter(torch.empty(0))  # a partitioned parameter holds no data of its own
    param.ds_shape = torch.Size(shape)
    for rank in range(ranks):
        write_whole(param, start, local_part(rank))
    assert torch.equal(whole(), start)
    for rank in range(ranks):
        write_rows(param, ids, rows, local_part(rank))
    assert torch.equal(whole(), expected)


def test_a_write_of_another_shape_is_refused_before_any_rank_writes():
    """A partitioned parameter's own shape is [0]: the check is against its full shape, so a
    projector of another LLM's width is refused on every rank, not written misaligned."""
    local_part, whole = _partitioned((7, 5), 3)
    param = nn.Parameter(torch.empty(0))
    param.ds_shape = torch.Size((7, 5))  # what DeepSpeed records on a partitioned parameter
    with pytest.raises(ValueError, match=r"shape \[7, 6\] into a parameter of shape \[7, 5\]"):
        write_whole(param, torch.zeros(7, 6), local_part(0))
    with pytest.raises(ValueError, match="width 6 into a parameter of shape"):
        write_rows(param, [1], torch.zeros(1, 6), local_part(2))
    assert torch.isnan(whole()).all()
