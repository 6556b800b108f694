"""The mixture spec: every error names its field and says what to change; includes,
overrides and relative paths resolve as documented; every checked-in YAML parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mixtures.conftest import spec_text
from vpit.mixtures import load_spec, make_plan
from vpit.mixtures.spec import parse_count

ROOT = Path(__file__).resolve().parents[2]

BASE = """
seed: 1
sources:
  vqa: {path: data/vqa, group: understanding}
  pairs: {path: data/pairs, group: generation, kind: generation}
groups:
  understanding: 7M
  generation: {count: 200k, split: equal}
"""


def _spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_counts_shorthand_and_relative_paths(tmp_path):
    spec = load_spec(_spec(tmp_path, BASE))
    assert [(g.name, g.count, g.split) for g in spec.groups] == [
        ("understanding", 7_000_000, "proportional"),
        ("generation", 200_000, "equal"),
    ]
    assert spec.sources[0].path == (tmp_path / "data" / "vqa").resolve()
    assert spec.sources[1].kind == "generation" and spec.repetition == "error" and spec.cache is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, 5), ("200k", 200_000), ("7M", 7_000_000), ("1.5B", 1_500_000_000), ("2.5k", 2_500), (3.0, 3)],
)
def test_parse_count(value, expected):
    assert parse_count(value, "x") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("7X", "expected a positive count"),
        ("1.2345k", "not a whole number"),
        (True, "expected a positive count"),
        (0, "must be > 0"),
        (-5, "must be > 0"),
        ("-3k", "expected a positive count"),
    ],
)
def test_parse_count_rejects(value, message):
    with pytest.raises(ValueError, match=f"groups.g.count: .*{message}"):
        parse_count(value, "groups.g.count")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # unknown key, at the top and nested, with what is allowed there
        ("sauces: {}\n", r"sauces: unknown key; allowed here: cache, dedup, description, groups, heldout, include"),
        (
            "groups: {generation: {cuont: 5}}\n",
            r"groups.generation.cuont: unknown key; allowed here: count, split, weight",
        ),
        ("sources: {vqa: {pth: x}}\n", r"sources.vqa.pth: unknown key; allowed here: group, kind, path"),
        # unknown source in an explicit split
        (
            "groups: {generation: {split: {pairs: 1, nope: 2}}}\n",
            r"groups.generation.split.nope: unknown source 'nope' for this group \(its sources: pairs\)",
        ),
        # zero and negative amounts
        ("groups: {generation: 0}\n", r"groups.generation.count: must be > 0, got 0; remove the group"),
        ("groups: {understanding: -5}\n", r"groups.understanding.count: must be > 0, got -5"),
        (
            "groups: {understanding: {count: null, weight: 0}, generation: {count: null, weight: 1}}\ntotal: 10\n",
            r"groups.understanding.weight: must be > 0, got 0.0",
        ),
        # weights with no total
        (
            "groups: {understanding: {count: null, weight: 0.7}, generation: {count: null, weight: 0.3}}\n",
            r"total: groups give weights but the spec has no total; add e.g. total: 1M",
        ),
        (
            "groups: {understanding: {weight: 0.7}}\n",
            r"groups.understanding: give exactly one of count or weight \(got both\)",
        ),
        ("total: 5M\n", r"total: only allowed with weights"),
        # wrong types, with the YAML path
        ("seed: abc\n", r"seed: expected an integer >= 0, got 'abc'"),
        ("repetition: sometimes\n", r"repetition: expected error or allow, got 'sometimes'"),
        ("sources: {vqa: {path: 3}}\n", r"sources.vqa.path: required, a string; got 3"),
        ("sources: {vqa: {kind: pictures}}\n", r"sources.vqa.kind: unknown kind 'pictures'; use one of understanding"),
        ("sources: {vqa: {group: videos}}\n", r"sources.vqa.group: unknown group 'videos'; declare it under groups:"),
        ("groups: {empty: 5}\n", r"groups.empty: no source belongs to this group"),
        (
            "groups: {generation: {split: random}}\n",
            r"groups.generation.split: expected one of proportional, equal, explicit",
        ),
        ("cache: ''\n", r"cache: expected a token-cache fingerprint string"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, edit, message):
    base = _spec(tmp_path, BASE, "base.yaml")
    path = _spec(tmp_path, f"include: {base.name}\n{edit}")
    with pytest.raises(ValueError, match=message):
        load_spec(path)


def test_all_problems_reported_at_once(tmp_path):
    path = _spec(tmp_path, BASE + "sauces: 1\nseed: -1\n")
    with pytest.raises(ValueError) as err:
        load_spec(path)
    assert "sauces: unknown key" in str(err.value) and "seed: expected an integer >= 0" in str(err.value)


def test_include_cycle(tmp_path):
    _spec(tmp_path, "include: b.yaml\nseed: 1\n", "a.yaml")
    _spec(tmp_path, "include: c.yaml\n", "b.yaml")
    _spec(tmp_path, "include: a.yaml\n", "c.yaml")
    with pytest.raises(ValueError, match=r"include: include cycle a.yaml -> b.yaml -> c.yaml -> a.yaml; remove one"):
        load_spec(tmp_path / "a.yaml")
    _spec(tmp_path, "include: self.yaml\n", "self.yaml")
    with pytest.raises(ValueError, match=r"include cycle self.yaml -> self.yaml"):
        load_spec(tmp_path / "self.yaml")


def test_include_overrides_and_relative_paths(tmp_path):
    (tmp_path / "base").mkdir()
    _spec(tmp_path / "base", BASE, "base.yaml")
    child = _spec(
        tmp_path,
        "include: base/base.yaml\nseed: 9\ngroups: {generation: 1M}\n"
        "sources: {extra: {path: more, group: generation}}\n",
    )
    spec = load_spec(child)
    assert spec.seed == 9
    gen = next(g for g in spec.groups if g.name == "generation")
    assert (gen.count, gen.split) == (1_000_000, "equal")  # the count changed, the split stayed
    paths = {s.name: s.path for s in spec.sources}
    assert paths["vqa"] == (tmp_path / "base" / "data" / "vqa").resolve()  # relative to the file that says it
    assert paths["extra"] == (tmp_path / "more").resolve()
    # null deletes an inherited key: switch a group from count to weight
    weights = _spec(
        tmp_path,
        "include: base/base.yaml\ntotal: 10k\ngroups:\n  understanding: {count: null, weight: 3}\n"
        "  generation: {count: null, weight: 1}\n",
        "w.yaml",
    )
    assert [g.weight for g in load_spec(weights).groups] == [3.0, 1.0]


def test_dotted_overrides(tmp_path):
    path = _spec(tmp_path, BASE)
    spec = load_spec(
        path,
        {
            "groups.generation.count": "4M",
            "seed": "5",
            "repetition": "allow",
            "sources.pairs.path": "elsewhere",
            "groups.understanding": "1M",
        },
    )
    assert [g.count for g in spec.groups] == [1_000_000, 4_000_000]
    assert (spec.seed, spec.repetition) == (5, "allow")
    assert spec.sources[1].path == (tmp_path / "elsewhere").resolve()
    with pytest.raises(ValueError, match=r"groups.generation.count: expected a positive count"):
        load_spec(path, {"groups.generation.count": "lots"})
    with pytest.raises(ValueError, match=r"override 'seed.x': seed is a value, not a mapping"):
        load_spec(path, {"seed.x": 1})


def test_missing_spec_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mixture spec .*nope.yaml does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_infeasible_count_without_repetition(mix_data):
    path = mix_data["root"] / "too_many.yaml"
    path.write_text(spec_text(None, gen=50))
    with pytest.raises(
        ValueError,
        match=r"groups.generation.count: group generation asks for 50 samples but pairs "
        r"needs 50 of 20; lower it to at most 20, add sources to group generation, "
        r"or set repetition: allow",
    ):
        make_plan(load_spec(path))
    plan = make_plan(load_spec(path, {"repetition": "allow"}))
    assert plan.counts["pairs"] == 50 and "repeats pairs: each sample 2 or 3 times (2.50x" in plan.table()


def test_missing_dataset_and_empty_kind(mix_data, tmp_path):
    path = _spec(
        tmp_path,
        f"sources:\n  a: {{path: {mix_data['mix']}, group: g, kind: video}}\n"
        "  b: {path: nowhere, group: g}\ngroups: {g: 5}\n",
    )
    with pytest.raises(ValueError) as err:
        make_plan(load_spec(path))
    assert f"sources.b.path: {(tmp_path / 'nowhere').resolve()} does not exist" in str(err.value)
    assert "sources.a.kind: " in str(err.value) and "has no samples of kind 'video' (it has: editing 10" in str(
        err.value
    )


def test_missing_cache_fingerprint(mix_data):
    path = mix_data["root"] / "bad_cache.yaml"
    path.write_text(spec_text("0123456789abcdef"))
    with pytest.raises(
        ValueError,
        match=rf"cache: source vqa \(.*\) has no usable token cache '0123456789abcdef': .*"
        rf"available: {mix_data['fingerprint']}. Build it with `vpit precompute",
    ):
        make_plan(load_spec(path))


def test_weights_with_total_plan_exactly(mix_data):
    path = mix_data["root"] / "weights.yaml"
    path.write_text(spec_text(None) + "total: 40\n")
    spec = load_spec(
        path,
        {
            "groups.understanding": {"weight": 0.5},
            "groups.generation": {"weight": 0.3},
            "groups.editing": {"weight": 0.2},
        },
    )
    plan = make_plan(spec)
    assert plan.groups == (("understanding", 20), ("generation", 12), ("editing", 8)) and plan.total == 40
    # proportional split of understanding: 49 vqa and 5 chat samples -> 18 and 2
    assert (plan.counts["vqa"], plan.counts["chat"]) == (18, 2)


def test_plan_hash_names_the_sequence_not_the_location(mix_data, tmp_path):
    import shutil

    a = mix_data["root"] / "hash.yaml"
    a.write_text(spec_text(mix_data["fingerprint"]))
    moved = tmp_path / "moved"
    shutil.copytree(mix_data["mix"], moved / "mix")
    b = moved / "hash.yaml"
    b.write_text(spec_text(mix_data["fingerprint"]))
    assert make_plan(load_spec(a)).hash == make_plan(load_spec(b)).hash
    assert make_plan(load_spec(a, {"seed": 1})).hash != make_plan(load_spec(a)).hash
    assert make_plan(load_spec(a, {"groups.generation": 17})).hash != make_plan(load_spec(a)).hash


@pytest.mark.parametrize("path", sorted((ROOT / "mixtures" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_checked_in_yaml_parses(path):
    spec = load_spec(path)
    assert spec.sources and spec.phases and all(p.groups for p in spec.phases)
