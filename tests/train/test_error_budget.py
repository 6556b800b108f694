"""The loader's error budget: an unreadable record is skipped in place and listed; the rest of the
sequence does not move; past the budget the run stops with one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.train.conftest import run_vpit


def _config(root: Path, spec: str, tokenizer: str, d: int, extra: str = "") -> Path:
    cfg = root / "train.yaml"
    cfg.write_text(f"""
output_dir: run
model: {{llm: tiny, tokenizer: {tokenizer}, chat_template: chatml, vision_dim: {d}, num_visual_tokens: 4,
         hidden_size: 32, num_heads: 2, intermediate_size: 64, num_layers: 1}}
data: {{mixture: {spec}, max_len: 256, num_workers: 0{extra}}}
micro_batch_size: 8
max_steps: 6
lr: 1e-3
lr_reference_batch: 8
save_every: 1000
loggers: []
""")
    return cfg


def _copy_mixture(train_mixture, dest: Path) -> Path:
    src = Path(train_mixture["spec"]).parent
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("run*"))
    return dest / "mix.yaml"


def _ids(run: Path) -> list[str]:
    return [i for line in (run / "samples-rank0.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]]


def _corrupt_records(root: Path, shard: int, samples: list[int]) -> list[str]:
    """Break the JSON members of some samples of a shard in place (same size: only reading finds it)."""
    idx = json.loads((root / "shards" / f"shard-{shard:06d}.idx.json").read_text())
    tar = root / "shards" / f"shard-{shard:06d}.tar"
    data = bytearray(tar.read_bytes())
    for p in samples:
        off, _ = idx["samples"][p]["members"]["json"]
        data[off] = ord("X")  # the record's opening brace
    tar.write_bytes(bytes(data))
    return [idx["samples"][p]["id"] for p in samples]


def test_an_unreadable_record_is_skipped_in_place_and_listed(tmp_path, train_mixture, bpe_tokenizer):
    clean = _copy_mixture(train_mixture, tmp_path / "clean")
    res = run_vpit(["train", str(_config(clean.parent, str(clean), bpe_tokenizer, train_mixture["d"]))])
    assert res.returncode == 0, res.stderr[-2000:]
    reference = _ids(clean.parent / "run")

    damaged = _copy_mixture(train_mixture, tmp_path / "damaged")
    broken = _corrupt_records(damaged.parent / "data", 0, [0, 5, 11])
    assert set(broken) & set(reference)  # the run reaches some of them
    budget = ", max_skipped_share: 0.5"  # 3 in 48 samples: over the default 0.1%, within this run's budget
    cfg = _config(damaged.parent, str(damaged), bpe_tokenizer, train_mixture["d"], budget)
    res = run_vpit(["train", str(cfg)])
    assert res.returncode == 0, res.stderr[-2000:]
    skipped = [json.loads(line) for line in (damaged.parent / "run" / "skipped-rank0.jsonl").read_text().splitlines()]
    assert {s["id"] for s in skipped} == set(broken) & set(reference)
    assert all("JSONDecodeError" in s["error"] for s in skipped)
    # every other sample, in the same places: the skipped ones are simply missing
    assert _ids(damaged.parent / "run") == [i for i in reference if i not in set(broken)]
    rows = [json.loads(line) for line in (damaged.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in rows) == len(skipped)


def test_past_the_budget_the_run_stops_with_one_clear_line(tmp_path, train_mixture, bpe_tokenizer):
    spec = _copy_mixture(train_mixture, tmp_path / "bad")
    _corrupt_records(spec.parent / "data", 1, list(range(12)))  # most of one shard: many batches in a row
    res = run_vpit(["train", str(_config(spec.parent, str(spec), bpe_tokenizer, train_mixture["d"]))])
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("vpit train: error:")]
    assert "past its error budget" in line and "vpit verify" in line and "Traceback" not in res.stderr
