"""A held-out split that is really held out: the same images under two understanding sources and
as caption-pair targets. By id hash the leak is counted and reported; by image no held-out image
reaches training, checked from what the stream yields (its records' image sha256s), not from
the split's own masks."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from tests.mixtures.helpers import make_dataset
from vpit.mixtures import MixtureStream, heldout_items, load_spec, make_plan
from vpit.mixtures.catalog import RecordReader, build_catalog, is_heldout
from vpit.shapes import encode_image, random_scene, render

FRACTION = 0.2


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """vqa: 60 records on 30 images (each image asked about twice); vqa2: 30 records, 20 of them
    on vqa's images; pairs: 40 caption pairs, 20 of whose targets are vqa's images."""
    root = tmp_path_factory.mktemp("shared-images")
    rng = np.random.default_rng(5)
    pool = []
    while len(pool) < 30:  # 30 distinct pictures
        data = encode_image(render(random_scene(rng), 16))
        if data not in pool:
            pool.append(data)
    make_dataset(root / "vqa", "vqa", [["understanding"] * 20] * 3, seed=1, images={i: pool[i % 30] for i in range(60)})
    make_dataset(root / "vqa2", "vqa2", [["understanding"] * 15] * 2, seed=2, images={i: pool[i] for i in range(20)})
    make_dataset(
        root / "pairs", "pairs", [["generation"] * 20] * 2, seed=3, images={i: pool[29 - i] for i in range(20)}
    )
    return root


def _spec(root, heldout: str, amounts=(1, 1, 1), name="spec"):
    path = root / f"{name}.yaml"
    path.write_text(
        f"""
seed: 0
heldout: {heldout}
sources:
  vqa: {{path: vqa, group: understanding}}
  vqa2: {{path: vqa2, group: understanding}}
  pairs: {{path: pairs, group: generation}}
groups:
  understanding: {{count: {amounts[0] + amounts[1]}, split: {{vqa: {amounts[0]}, vqa2: {amounts[1]}}}}}
  generation: {{count: {amounts[2]}}}
"""
    )
    return load_spec(path)


def _all_records(root):
    """(dataset, id, image sha256s) of every sample of the three datasets."""
    out = []
    for name in ("vqa", "vqa2", "pairs"):
        cat = build_catalog(root / name, None, name)
        reader = RecordReader(cat.root, cat.shard_names)
        shards, positions = cat.locate(np.arange(cat.size))
        for s, p in zip(shards.tolist(), positions.tolist(), strict=True):
            r = reader.record(s, p)
            out.append((name, r["id"], [img["sha256"] for img in r["images"]]))
        reader.close()
    return out


def _streamed_images(spec):
    """Train on everything the split leaves: plan every available sample, read the stream."""
    first = make_plan(spec)
    avail = {s.name: s.available for s in first.sources}
    full = _spec(
        spec.sources[0].path.parent,
        json.dumps(spec.to_dict()["heldout"]),
        (avail["vqa"], avail["vqa2"], avail["pairs"]),
        name=f"full-{spec.heldout_by}",
    )
    plan = make_plan(full)
    items = [item for batch in MixtureStream(plan, global_batch_size=8, with_tokens=False) for item in batch]
    assert len(items) == plan.total  # everything the split leaves trains
    return plan, items, {img["sha256"] for item in items for img in item["record"]["images"]}


def test_the_id_hash_split_leaks_and_the_plan_counts_it(shared):
    records = _all_records(shared)
    held_images = {sha for _, i, shas in records if is_heldout(i, FRACTION) for sha in shas}
    leak = Counter(name for name, i, shas in records if not is_heldout(i, FRACTION) and set(shas) & held_images)
    assert sum(leak.values()) > 0  # the data was built so that it leaks

    spec = _spec(shared, str(FRACTION))  # the old form: by id hash, as before
    assert spec.heldout_by == "id"
    plan, items, trained = _streamed_images(spec)
    assert trained & held_images  # the stream really trains on held-out images
    reported = {r["dataset"].rsplit("/", 1)[-1]: r["leak_by_id"] for r in plan.heldout}
    assert reported == {n: leak.get(n, 0) for n in ("vqa", "vqa2", "pairs")}
    assert "LEAK" in plan.table()


def test_the_image_split_holds_out_every_sample_sharing_a_held_out_image(shared):
    spec = _spec(shared, f"{{fraction: {FRACTION}}}")
    assert spec.heldout_by == "image"
    plan, items, trained = _streamed_images(spec)
    held = heldout_items(spec)
    held_images = {img["sha256"] for item in held for img in item["record"]["images"]}
    assert held_images and not trained & held_images  # from the stream's own records
    # nothing is lost: train + held out = every sample, once
    records = _all_records(shared)
    assert len(items) + len(held) == len(records)
    assert {i["id"] for i in items} | {i["id"] for i in held} == {i for _, i, _ in records}
    # the id-hash seed is held out, and grouping moved more, counted in the plan
    seeded = {i for _, i, _ in records if is_heldout(i, FRACTION)}
    assert seeded <= {i["id"] for i in held}
    moved = sum(r["moved"] for r in plan.heldout)
    assert moved == len(held) - len(seeded) > 0
    assert "held out by image" in plan.table()


def test_the_split_does_not_depend_on_the_seed(shared):
    a = _spec(shared, f"{{fraction: {FRACTION}}}", name="a")
    b = load_spec(shared / "a.yaml", {"seed": 7})
    ids = [{i["id"] for i in heldout_items(s)} for s in (a, b)]
    assert ids[0] == ids[1]


def test_near_duplicates_join_the_group(tmp_path):
    """A caption pair whose target is a re-encoded, resized copy of a held-out VQA image is
    held out with `near: true`, and trains without it."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [_photo(rng) for _ in range(24)]
    copies = {}
    for i, data in enumerate(photos):
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((96, 96))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        copies[i] = buf.getvalue()
    make_dataset(tmp_path / "vqa", "vqa", [["understanding"] * 24], images=dict(enumerate(photos)))
    make_dataset(tmp_path / "pairs", "pairs", [["generation"] * 24], images=copies)
    (tmp_path / "vqa2").symlink_to(tmp_path / "vqa")  # the spec's second source reads vqa again
    held_vqa = {f"vqa:{i:06d}" for i in range(24) if is_heldout(f"vqa:{i:06d}", 0.3)}
    expect = {f"pairs:{int(i.split(':')[1]):06d}" for i in held_vqa}
    for near, leaked in ((False, True), (True, False)):
        spec = _spec(tmp_path, f"{{fraction: 0.3, near: {str(near).lower()}}}", name=f"near-{near}")
        held = {i["id"] for i in heldout_items(spec)}
        assert bool(expect - held) == leaked, (near, sorted(expect - held))


def _photo(rng) -> bytes:
    """A photo-like picture: smooth random colour fields (what near hashes are made for)."""
    import io

    from PIL import Image

    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((128, 128), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_dedup_leaves_repeated_generation_targets_out_of_training(tmp_path):
    """30 caption pairs on 12 pictures (18 repeats), and 6 re-encoded copies: dedup exact trains
    each picture once by bytes, near once by picture; understanding samples are never dropped."""
    import io

    from PIL import Image

    rng = np.random.default_rng(4)
    photos = [_photo(rng) for _ in range(12)]
    images = {i: photos[i % 12] for i in range(30)}
    for i in range(30, 36):  # re-encoded, resized copies of photos 0..5
        buf = io.BytesIO()
        Image.open(io.BytesIO(photos[i - 30])).convert("RGB").resize((96, 96)).save(buf, "JPEG", quality=85)
        images[i] = buf.getvalue()
    make_dataset(tmp_path / "pairs", "pairs", [["generation"] * 36], images=images)
    make_dataset(tmp_path / "vqa", "vqa", [["understanding"] * 10], images={i: photos[0] for i in range(10)})
    for dedup, expect in ((None, 36), ("exact", 18), ("near", 12)):
        path = tmp_path / f"d-{dedup}.yaml"
        path.write_text(
            (f"dedup: {dedup}\n" if dedup else "")
            + "sources:\n  pairs: {path: pairs, group: generation}\n  vqa: {path: vqa, group: understanding}\n"
            + "groups: {generation: 1, understanding: 1}\n"
        )
        plan = make_plan(load_spec(path))
        avail = {s.name: s.available for s in plan.sources}
        assert avail == {"pairs": expect, "vqa": 10}, (dedup, avail)
        if dedup:
            assert f"{36 - expect:,} left out" in plan.table()
            path.write_text(path.read_text().replace("generation: 1,", f"generation: {expect},"))
            stream = MixtureStream(make_plan(load_spec(path)), global_batch_size=6, with_tokens=False)
            shas = [item["record"]["images"][0]["sha256"] for b in stream for item in b if item["source"] == "pairs"]
            assert len(shas) == len(set(shas)) == expect  # every target once, from the stream itself


def test_the_plan_hash_names_the_split_and_the_dedup(shared):
    """A saved plan or a resume must not take one split for another."""
    hashes = {
        make_plan(_spec(shared, h, name=f"h{i}")).hash
        for i, h in enumerate((str(FRACTION), f"{{fraction: {FRACTION}}}", f"{{fraction: {FRACTION}, near: true}}"))
    }
    assert len(hashes) == 3
    path = shared / "spec.yaml"
    plain = make_plan(load_spec(path)).hash
    path2 = shared / "spec-dedup.yaml"
    path2.write_text(path.read_text() + "dedup: exact\n")
    assert make_plan(load_spec(path2)).hash != plain  # pairs repeats vqa pictures: dedup drops some


def test_dedup_keeps_a_copy_whose_first_is_never_drawn(tmp_path):
    """A generation sample that no source draws (filtered out by kind) is not a 'first copy'."""
    rng = np.random.default_rng(6)
    photo = _photo(rng)
    make_dataset(tmp_path / "d", "d", [["understanding", "generation"]], images={1: photo})
    make_dataset(tmp_path / "e", "e", [["generation"] * 2], images={0: photo})
    path = tmp_path / "k.yaml"
    path.write_text(
        "dedup: exact\nsources:\n  u: {path: d, group: understanding, kind: understanding}\n"
        "  g: {path: e, group: generation, kind: generation}\ngroups: {understanding: 1, generation: 2}\n"
    )
    plan = make_plan(load_spec(path))
    assert {s.name: s.available for s in plan.sources} == {"u": 1, "g": 2}


def test_evaluating_a_run_whose_datasets_changed_says_so(shared, tmp_path, capsys):
    from vpit.mixtures.plan import save_plan
    from vpit.train.evaluate import _warn_if_replanned

    spec = _spec(shared, f"{{fraction: {FRACTION}}}", name="trained")
    save_plan(make_plan(spec), tmp_path / "run" / "plan")
    _warn_if_replanned(tmp_path / "run", spec)
    assert "warning" not in capsys.readouterr().err
    changed = _spec(shared, f"{{fraction: {FRACTION}, near: true}}", name="trained")  # the same file, changed
    _warn_if_replanned(tmp_path / "run", changed)
    assert "may include samples the run trained on" in capsys.readouterr().err
