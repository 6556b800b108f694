"""Writes into ZeRO-3 partitions (model/sharded_load.py): a rank writes only its slice of the
flattened parameter, and rows that straddle two ranks' slices land whole. The partition layout is
DeepSpeed's (equal slices of the flattened parameter, the last one padded); the real partitions are
written at world size 2 in tests/train/zero_probe.py."""

from __future__ import annotations

import torch
from torch import nn

from vpit.model.sharded_load import write_rows, write_whole


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
    for rank in range(ranks):
        write_whole(param, start, local_part(rank))
    assert torch.equal(whole(), start)
    for rank in range(ranks):
        write_rows(param, ids, rows, local_part(rank))
    assert torch.equal(whole(), expected)
