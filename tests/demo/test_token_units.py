"""Amounts in tokens on the demo's real shards: the planner turns token amounts into sample
counts, and the tokens the stream then delivers, counted with the same tokenizer, come within
1% of the shares the spec asked for in every phase."""

from __future__ import annotations

from collections import defaultdict

from vpit.mixtures import MixtureStream, load_spec, make_plan
from vpit.mixtures.plan import sample_tokens
from vpit.model.tokenizer import load_tokenizer

SPEC = """
unit: tokens
tokenizer: {out}/tokenizer
sources:
  vqa: {{path: {out}/datasets/understanding, group: understanding, kind: understanding}}
  videoqa: {{path: {out}/datasets/videoqa, group: understanding, kind: understanding}}
  pairs: {{path: {out}/datasets/generation, group: generation, kind: generation}}
phases:
  - name: one
    total: {one}
    groups: {{understanding: {{weight: 1}}, generation: {{weight: 3}}}}
  - name: two
    total: {two}
    groups: {{understanding: {{weight: 2}}, generation: {{weight: 2}}}}
"""


def test_token_amounts_give_the_token_shares_asked_for_on_demo_shards(quick_demo, tmp_path):
    out = quick_demo["out"]
    path = tmp_path / "tokens.yaml"
    # a first plan measures tokens per sample; the real one asks for 90% of the understanding
    # tokens there are (the scarcer group), 1/5 of them in phase one, 4/5 in phase two
    path.write_text(SPEC.format(out=out, one=100, two=100))
    probe = make_plan(load_spec(path))
    und = sum(s.available * s.tokens_per_sample for s in probe.sources if s.group == "understanding")
    path.write_text(SPEC.format(out=out, one=int(0.9 * und * 0.2 * 4), two=int(0.9 * und * 0.8 * 2)))
    plan = make_plan(load_spec(path))
    assert plan.spec.unit == "tokens" and all(s.tokens_per_sample > 0 for s in plan.sources)

    tok = load_tokenizer(plan.spec.tokenizer)
    got: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for batch in MixtureStream(plan, global_batch_size=16, with_tokens=False):
        for item in batch:
            got[item["phase"]][item["group"]] += sample_tokens(item["record"], tok, plan.m)
    for phase in plan.phases:
        asked = dict(phase.tokens)
        realised = got[phase.name]
        for g in asked:
            planned_share = asked[g] / sum(asked.values())
            realised_share = realised[g] / sum(realised.values())
            assert abs(realised_share - planned_share) < 0.01, (phase.name, g, planned_share, realised_share)
        # and the phase ends near its token amount (the counts are rounded from estimates)
        assert abs(sum(realised.values()) / sum(asked.values()) - 1) < 0.05, phase.name
    table = plan.table(16)
    assert "token shares per phase, asked for (unit: tokens)" in table and "tokens/sample: vqa" in table
