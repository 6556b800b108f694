"""The dataset card: README.md with the Hub's YAML header, so `datasets.load_dataset(FOLDER)`
opens a vpit dataset with no features passed by hand; counts, quarantine, config, fingerprint,
licence and citation in the body; `vpit inspect` shows it."""

from __future__ import annotations

import subprocess

import datasets
import pytest

from vpit.common import subprocess_env, vpit_argv
from vpit.demo.corpora import write_bad_llava_records, write_llava_dataset
from vpit.pipelines.card import read_card
from vpit.pipelines.shards import Dataset, load_manifest


@pytest.fixture(scope="module")
def carded(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    info = write_llava_dataset(root / "raw", 60, seed=2)
    with open(info["jsonl"], "ab") as f:
        f.write(b"\n".join(write_bad_llava_records(root / "raw", bomb_side=1100)) + b"\n")
    out = root / "ds"
    cmd = vpit_argv(
        "ingest", "llava", str(info["jsonl"]), "--image-root", str(root / "raw"), "-o", str(out),
        "--shard-size", "16", "--max-pixels", "1000000", "--license", "cc-by-4.0",
        "--citation", "@misc{shapes2026, title={Shapes}}",
    )  # fmt: skip
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, info


def test_load_dataset_opens_the_folder_without_features(carded, tmp_path):
    out, info = carded
    manifest = load_manifest(out)
    # mixed members (no image, PNG, JPEG, two images) are what make the inferred schema fail
    assert len({m for e in manifest["shards"] for m in e["members"]}) > 2
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == manifest["samples"]
    assert [r["id"] for r in ds["json"]] == [s.record["id"] for s in Dataset(out)]  # every sample, in order
    with_image = next(r for r in ds if any(r[k] is not None for k in r if k.startswith("img")))
    assert any(hasattr(with_image[k], "size") for k in with_image if k.startswith("img"))  # PIL images


def test_the_card_says_what_the_dataset_holds(carded):
    out, _ = carded
    manifest = load_manifest(out)
    meta = read_card(out)
    assert meta["license"] == "cc-by-4.0" and meta["configs"][0]["data_files"][0]["path"] == "shards/*.tar"
    body = (out / "README.md").read_text()
    for kind, n in manifest["kinds"].items():
        assert f"| {kind} | {n:,} |" in body
    assert sum(manifest["quarantined"].values()) > 0
    for reason, n in manifest["quarantined"].items():
        assert f"| {reason} | {n:,} |" in body
    assert manifest["config"]["input_sha256"] in body and "@misc{shapes2026" in body
    res = subprocess.run(
        vpit_argv("inspect", str(out), "-n", "0"), env=subprocess_env(), capture_output=True, text=True
    )
    assert "license cc-by-4.0, citation set" in res.stdout, res.stdout
