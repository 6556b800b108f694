"""Editing ingest: every layout and file format, exact quarantine counts, image roles, prompts;
and visual-thinking records (an image in an assistant turn) through the LLaVA adapter."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from vpit.demo.corpora import BAD_EDIT_CASES, write_edit_triplets
from vpit.pipelines.editing import EditingAdapter, EditingConfig
from vpit.pipelines.ingest import IngestError, run_ingest
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
from vpit.pipelines.shards import Dataset
from vpit.shapes import encode_image, random_edit, random_scene, render

N = 12


def _expected_triplets(n: int, seed: int = 0):
    """(instruction, source pixels, target pixels), regenerated from the seed independently of the files."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, max_shapes=2)
        instruction, edited = random_edit(rng, scene)
        out.append((instruction, np.asarray(render(scene, 64)), np.asarray(render(edited, 64))))
    return out


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("layout,fmt", [("generic", "jsonl"), ("instructpix2pix", "parquet"), ("magicbrush", "jsonl")])
def test_editing_layouts(tmp_path, ray_local, layout, fmt):
    info = write_edit_triplets(tmp_path / "raw", N, seed=0, layout=layout, fmt=fmt)
    adapter = EditingAdapter(EditingConfig(input=str(info["path"]), shard_size=5))
    assert adapter.config.layout == layout  # auto-detected from the field names
    report = run_ingest(adapter, tmp_path / "ds", workers=2, progress=False)
    assert report.samples == N
    assert report.kinds == {"editing": N}
    assert report.quarantined == {"identical_images": 1, "missing_field": 1, "missing_image": 1}
    ds = Dataset(tmp_path / "ds")
    assert [q["reason"] for q in ds.quarantine()] == list(BAD_EDIT_CASES)  # input order
    where = [q["origin"]["line"] - 1 if fmt == "jsonl" else q["origin"]["row"] for q in ds.quarantine()]
    assert where == [N, N + 1, N + 2]  # the bad rows follow the good ones

    for sample, (instruction, src, tgt) in zip(ds, _expected_triplets(N), strict=True):
        rec = sample.record
        assert rec["messages"] == [
            {"role": "user", "content": [{"image": 0}, {"text": instruction}]},  # source: input
            {"role": "assistant", "content": [{"text": "Here is the edited image:"}, {"image": 1}]},  # target
        ]
        assert np.array_equal(_pixels(sample.images[0]), src)
        assert np.array_equal(_pixels(sample.images[1]), tgt)


def test_identical_pixels_in_other_encoding_are_quarantined(tmp_path, ray_local):
    img = render(random_scene(np.random.default_rng(5)), 64)
    png, png_fast = encode_image(img), io.BytesIO()
    img.save(png_fast, format="PNG", compress_level=0)  # other bytes, same pixels
    other = encode_image(render(random_scene(np.random.default_rng(6)), 64))
    rows = [
        {
            "source": {"bytes": base64.b64encode(png).decode()},
            "instruction": "do nothing",
            "target": {"bytes": base64.b64encode(png_fast.getvalue()).decode()},
        },
        {
            "source": {"bytes": base64.b64encode(png).decode()},
            "instruction": "  ",
            "target": {"bytes": base64.b64encode(other).decode()},
        },
        {
            "source": {"bytes": "***not base64***"},
            "instruction": "x",
            "target": {"bytes": base64.b64encode(other).decode()},
        },
        {
            "source": {"bytes": base64.b64encode(png).decode()},
            "instruction": "swap",
            "target": {"bytes": base64.b64encode(other).decode()},
        },
    ]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    report = run_ingest(
        EditingAdapter(EditingConfig(input=str(path), layout="generic")), tmp_path / "ds", workers=1, progress=False
    )
    assert report.samples == 1
    assert report.quarantined == {"identical_images": 1, "missing_field": 1, "unreadable_image": 1, "malformed_json": 1}


def test_unknown_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"before": "a.png", "prompt": "x", "after": "b.png"}) + "\n")
    with pytest.raises(IngestError, match=r"fields \['after', 'before', 'prompt'\] match no layout"):
        EditingAdapter(EditingConfig(input=str(path)))
    with pytest.raises(ValueError, match="layout: expected auto or one of"):
        EditingConfig(input=str(path), layout="pix2pix")


def test_visual_thinking_through_llava(tmp_path, ray_local):
    """MetaMorph's visual thinking: reasoning text, then an image as the assistant's target."""
    (tmp_path / "cat.png").write_bytes(encode_image(render(random_scene(np.random.default_rng(1)), 32)))
    (tmp_path / "q.png").write_bytes(encode_image(render(random_scene(np.random.default_rng(2)), 32)))
    records = [
        {
            "id": "t0",
            "image": "cat.png",
            "conversations": [
                {"from": "human", "value": "Generate an image of the animal with 2+7 lives."},
                {"from": "gpt", "value": "2+7 = 9, and the animal said to have nine lives is a cat. <image>"},
            ],
        },
        {
            "id": "t1",
            "image": ["q.png", "cat.png"],
            "conversations": [
                {"from": "human", "value": "<image>\nDraw what comes after this."},
                {"from": "gpt", "value": "Let me think: the next one.\n<image>"},
            ],
        },
        {
            "id": "u0",
            "image": "q.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "shapes"}],
        },
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = run_ingest(
        LlavaAdapter(LlavaConfig(input=str(path), image_root=str(tmp_path))), tmp_path / "ds", workers=1, progress=False
    )
    assert report.kinds == {"thinking": 2, "understanding": 1}
    t0, t1, u0 = (s.record for s in Dataset(tmp_path / "ds"))
    assert t0["messages"][1] == {
        "role": "assistant",
        "content": [{"text": "2+7 = 9, and the animal said to have nine lives is a cat."}, {"image": 0}],
    }  # target
    assert t0["messages"][0]["content"] == [{"text": "Generate an image of the animal with 2+7 lives."}]
    assert t1["messages"][0]["content"][0] == {"image": 0}  # input
    assert t1["messages"][1]["content"] == [{"text": "Let me think: the next one."}, {"image": 1}]  # target
    assert u0["kind"] == "understanding"


def test_editing_output_independent_of_workers(tmp_path, ray_local):
    info = write_edit_triplets(tmp_path / "raw", 9, seed=1, layout="instructpix2pix", fmt="jsonl")
    shas = []
    for workers in (1, 2):
        adapter = EditingAdapter(EditingConfig(input=str(info["path"]), shard_size=4))
        run_ingest(adapter, tmp_path / f"ds{workers}", workers=workers, progress=False)
        shas.append([s["tar_sha256"] for s in Dataset(tmp_path / f"ds{workers}").shards])
    assert len(shas[0]) == 3 and shas[0] == shas[1]
