"""`vpit train` on a mixture whose sources live on S3 (moto's server on 127.0.0.1) trains on exactly
the samples, and to exactly the losses, of the same run over the same data on local disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mixtures.helpers import upload_folder
from tests.train.conftest import run_vpit
from tests.train.test_resume import _config, _ids


def _losses(run: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["text_loss"], r["vision_loss"]) for r in rows]


@pytest.mark.slow
def test_training_from_s3_sees_the_samples_and_losses_of_a_local_run(tmp_path, train_mixture, bpe_tokenizer, s3):
    url, _ = s3
    spec = Path(train_mixture["spec"])
    upload_folder(spec.parent / "data", f"{url}/data")
    remote_spec = tmp_path / "mix.yaml"
    remote_spec.write_text(spec.read_text().replace("path: data,", f"path: {url}/data,"))
    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    local = run_vpit(["train", str(_config(tmp_path / "local.yaml", local_dir, train_mixture, bpe_tokenizer))])
    assert local.returncode == 0, local.stderr[-3000:]
    remote_mix = dict(train_mixture, spec=str(remote_spec))
    remote = run_vpit(["train", str(_config(tmp_path / "remote.yaml", remote_dir, remote_mix, bpe_tokenizer))])
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert _ids(remote_dir, 0) == _ids(local_dir, 0) and len(_ids(local_dir, 0)) == 24
    assert _losses(remote_dir) == _losses(local_dir)
    cached = list((tmp_path / "node-cache" / "objects").iterdir())  # the s3 fixture's VPIT_CACHE_DIR
    assert cached and not any(p.name.endswith(".tar") for p in cached)
