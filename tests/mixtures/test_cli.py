"""`vpit mix plan` and `vpit mix inspect` through the real CLI entry point."""

from __future__ import annotations

import json

from tests.mixtures.conftest import spec_text
from vpit.cli import main
from vpit.mixtures import load_spec, make_plan
from vpit.mixtures.inspect import lineage_ids


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_plan_prints_the_table_and_writes_nothing(mix_data, capsys):
    spec = mix_data["root"] / "cli.yaml"
    spec.write_text(spec_text(mix_data["fingerprint"], und=30, gen=16, edit=6))
    before = _tree(mix_data["root"])
    assert main(["mix", "plan", str(spec), "--set", "groups.editing.count=8"]) == 0
    out = capsys.readouterr().out
    assert _tree(mix_data["root"]) == before
    plan = make_plan(load_spec(spec, {"groups.editing.count": 8}))
    assert f"plan hash {plan.hash}" in out and f"token cache {mix_data['fingerprint']} (m=4, d=32)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    # source  group  kind  available  planned  repeat ...
    assert rows["vqa"][3:6] == ["44", str(plan.counts["vqa"]), f"{plan.counts['vqa'] / 44:.2f}x"]
    assert rows["edits"][3:6] == ["10", "8", "0.80x"]
    assert rows["understanding"][1:3] == ["30", f"{30 / 54:.1%}"] and rows["total"][1] == "54"


def test_plan_reports_infeasible_spec_without_traceback(mix_data, capsys):
    spec = mix_data["root"] / "cli_bad.yaml"
    spec.write_text(spec_text(None, edit=11))
    assert main(["mix", "plan", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        "groups.editing.count: group editing asks for 11 samples but edits needs 11 of 10; lower it to at most 10"
        in err
    )
    assert main(["mix", "plan", str(spec), "--set", "nonsense"]) == 2
    assert "--set 'nonsense': expected KEY=VALUE" in capsys.readouterr().err


def test_inspect_writes_png_and_lineage(mix_data, tmp_path, capsys):
    spec = mix_data["root"] / "cli_inspect.yaml"
    spec.write_text(spec_text(None, und=30, gen=16, edit=6))
    png, lineage = tmp_path / "ratio.png", tmp_path / "ids.jsonl"
    assert (
        main(
            [
                "mix",
                "inspect",
                str(spec),
                "--steps",
                "5",
                "--batch-size",
                "8",
                "--png",
                str(png),
                "--lineage",
                str(lineage),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "realised batches match the plan's schedule" in out and "OUTSIDE" not in out
    assert "understanding" in out and "52 samples in 7 global batches of 8" in out
    steps = [json.loads(line) for line in lineage.read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(5)) and all(len(s["ids"]) == 8 for s in steps)
    # the lineage of a run is a pure function of plan and batch size: the index alone reproduces it
    plan = make_plan(load_spec(spec))
    assert [ids for _, ids in lineage_ids(plan, 8, 0, 5)] == [s["ids"] for s in steps]
