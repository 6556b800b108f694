"""Pairs ingest against a real localhost http.server with real img2dataset: exact counts per
quarantine reason (404, opt-out header, HTML page, truncated PNG, empty caption), image roles,
rendered prompts, existing-folder input, the opt-out switch with SIGKILL-and-resume, and the time limit."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from vpit.common import subprocess_env, vpit_argv
from vpit.demo.corpora import BAD_PAIR_CASES, serve_http, write_pairs
from vpit.pipelines.ingest import IngestError
from vpit.pipelines.pairs import PairsConfig, ingest_pairs
from vpit.pipelines.shards import Dataset
from vpit.pipelines.templates import load_templates

N = 20
EXPECTED_QUARANTINE = {"download_disallowed": 1, "download_failed": 1, "missing_field": 1, "unreadable_image": 2}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _served(www: Path, url: str) -> bytes:
    return (www / url.split("/", 3)[3]).read_bytes()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    (root / "www").mkdir()
    with serve_http(root / "www") as base:
        yield root, write_pairs(root, N, base, seed=4)


@pytest.fixture(scope="module")
def reference(served, tmp_path_factory, ray_local):
    root, info = served
    out = tmp_path_factory.mktemp("pairs-out") / "ds"
    cfg = PairsConfig(input=str(info["url_list"]), shard_size=10, threads=8)
    report, stats = ingest_pairs(cfg, out, workers=2, progress=False)
    return out, report, stats


def _check_samples(ds: Dataset, info: dict, extra: tuple[int, ...] = ()) -> None:
    templates = load_templates()
    samples = list(ds)
    rows = list(range(N)) + list(extra)
    assert [s.record["id"] for s in samples] == [f"pairs:{i:09d}" for i in rows]  # no loss, no duplicate
    for i, s in zip(rows, samples):
        rec = s.record
        caption = info["captions"][i]
        assert rec["kind"] == "generation" and rec["caption"] == caption
        user, assistant = rec["messages"]
        assert user == {
            "role": "user",
            "content": [{"text": templates.user("generation", rec["key"], 0, caption=caption)}],
        }
        assert user["content"][0]["text"] in [t.format(caption=caption) for t in templates.groups["generation"].user]
        assert assistant == {
            "role": "assistant",
            "content": [{"text": "Here is an image based on your request:"}, {"image": 0}],
        }  # the image is the target
        assert rec["origin"]["uri"] == info["urls"][i]
        assert s.images[0] == _served(info["www"], info["urls"][i])  # bytes kept as served
    # The seeded rule really varies the prompt, and MetaMorph's default is among them.
    prompts = [s.record["messages"][0]["content"][0]["text"] for s in samples]
    assert len({p.split(" of ")[0] for p in prompts}) >= 3
    assert any(p.startswith("Generate an image of ") for p in prompts)


def test_pairs_counts_roles_prompts(served, reference):
    root, info = served
    out, report, stats = reference
    assert report.samples == N and report.kinds == {"generation": N}
    assert report.quarantined == EXPECTED_QUARANTINE
    ds = Dataset(out)
    quarantine = ds.quarantine()
    assert [q["reason"] for q in quarantine] == list(BAD_PAIR_CASES)
    assert [q["origin"]["uri"] for q in quarantine] == info["urls"][N:]
    assert quarantine[0]["detail"].endswith("HTTP Error 404: File not found")  # img2dataset's own message
    assert quarantine[1]["detail"].endswith("Use of image disallowed by X-Robots-Tag directive")
    _check_samples(ds, info)
    # img2dataset's own output and stats are kept beside our shards.
    assert stats == {
        "count": N + 5,
        "successes": N + 3,
        "failed_to_download": 2,
        "failed_to_resize": 0,
        "shards": 3,
        "errors": {"HTTP Error 404: File not found": 1, "Use of image disallowed by X-Robots-Tag directive": 1},
    }
    assert sorted(p.name for p in (out / "img2dataset").glob("*_stats.json")) == [
        f"0000{i}_stats.json" for i in range(3)
    ]
    # the download's tars went as their shards were recorded: the disk holds one copy, not two
    assert sorted(p.name for p in (out / "img2dataset").glob("*")) == sorted(
        [f"0000{i}{ext}" for i in range(3) for ext in (".parquet", "_stats.json")] + ["img2dataset.log"]
    )


def test_keep_download_keeps_the_tars_and_an_existing_folder_is_never_emptied(served, tmp_path, ray_local):
    root, info = served
    cfg = PairsConfig(input=str(info["url_list"]), shard_size=10, threads=8, keep_download=True)
    report, _ = ingest_pairs(cfg, tmp_path / "kept", workers=2, progress=False)
    tars = sorted(p.name for p in (tmp_path / "kept" / "img2dataset").glob("*.tar"))
    assert tars == ["00000.tar", "00001.tar", "00002.tar"]
    # a folder the user gives is theirs: ingesting it deletes nothing
    again, _ = ingest_pairs(PairsConfig(input=str(tmp_path / "kept" / "img2dataset"), shard_size=10), tmp_path / "ds")
    assert again.samples == report.samples
    assert sorted(p.name for p in (tmp_path / "kept" / "img2dataset").glob("*.tar")) == tars


def test_existing_img2dataset_folder(served, reference, tmp_path, ray_local):
    root, info = served
    out, _, _ = reference
    folder = tmp_path / "img2dataset"  # a download made by hand (bare img2dataset keeps its tars)
    ingest_pairs(
        PairsConfig(
            input=str(info["url_list"]), shard_size=10, threads=8, keep_download=True, download_dir=str(folder)
        ),
        tmp_path / "first",
        progress=False,
    )
    report, _ = ingest_pairs(PairsConfig(input=str(folder), shard_size=10), tmp_path / "ds", progress=False)
    assert report.samples == N and report.quarantined == EXPECTED_QUARANTINE
    # Same img2dataset shards -> byte-identical tars, whatever input form was used.
    assert [s["tar_sha256"] for s in Dataset(tmp_path / "ds").shards] == [s["tar_sha256"] for s in Dataset(out).shards]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(procs: list[psutil.Process], timeout_s: float = 15) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(procs)


@pytest.fixture(scope="module")
def slow_served(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs-slow")
    (root / "www").mkdir()
    with serve_http(root / "www", delay_s=0.2) as base:
        yield root, write_pairs(root, N, base, seed=5)


def test_kill_during_download_then_resume(slow_served, tmp_path, ray_local):
    root, info = slow_served
    out = tmp_path / "ds"
    # --no-respect-opt-out: this run also proves the switch (the noai image becomes a sample).
    cmd = [
        *vpit_argv(),
        "ingest",
        "pairs",
        str(info["url_list"]),
        "-o",
        str(out),
        "--shard-size",
        "5",
        "--threads",
        "2",
        "--workers",
        "1",
        "--no-respect-opt-out",
    ]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stats_dir = out / "img2dataset"
    deadline = time.monotonic() + 120
    while not list(stats_dir.glob("*_stats.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, "vpit ended before the first img2dataset shard finished"
        time.sleep(0.05)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any("pipelines.img2dataset_job" in " ".join(p.cmdline()) for p in tree)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The downloader (own session, spawn pool, logger) must not outlive the killed command.
    assert _wait_gone(tree) == []
    done_before = {p.name: p.stat().st_mtime_ns for p in stats_dir.glob("*_stats.json")}
    assert 1 <= len(done_before) < 5, "the kill must land mid-download for this test to mean anything"
    assert not (out / "manifest.json").exists()

    cfg = PairsConfig(input=str(info["url_list"]), shard_size=5, threads=2, respect_opt_out=False)
    report, stats = ingest_pairs(cfg, out, workers=2, progress=False)
    assert report.samples == N + 1
    assert report.quarantined == {"download_failed": 1, "missing_field": 1, "unreadable_image": 2}
    assert stats["count"] == N + 5 and stats["shards"] == 5
    after = {p.name: p.stat().st_mtime_ns for p in stats_dir.glob("*_stats.json")}
    assert all(after[name] == t for name, t in done_before.items())  # finished shards were not downloaded again
    _check_samples(Dataset(out), info, extra=(N + 1,))
    assert [q["reason"] for q in Dataset(out).quarantine()] == [r for r in BAD_PAIR_CASES if r != "download_disallowed"]


def test_download_time_limit_kills_the_job(slow_served, tmp_path):
    root, info = slow_served
    before = set(p.pid for p in psutil.Process().children(recursive=True))
    cfg = PairsConfig(input=str(info["url_list"]), shard_size=5, threads=1, job_timeout_s=2)
    with pytest.raises(IngestError, match=r"img2dataset did not finish within 2s .*re-run to resume"):
        ingest_pairs(cfg, tmp_path / "ds", progress=False)
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and "img2dataset_job" in " ".join(p.cmdline())
    ]
    assert _wait_gone(left, 5) == []


def test_bad_url_list_is_a_clear_error(tmp_path):
    (tmp_path / "u.csv").write_text("link,text\nhttp://127.0.0.1:9/x.png,a\n")
    with pytest.raises(IngestError, match=r"u.csv: no column 'url' \(--url-col\); the columns are \['link', 'text'\]"):
        ingest_pairs(PairsConfig(input=str(tmp_path / "u.csv")), tmp_path / "ds", progress=False)
    (tmp_path / "u.txt").write_text("http://127.0.0.1:9/x.png\n")
    with pytest.raises(IngestError, match="neither a folder nor a URL list"):
        ingest_pairs(PairsConfig(input=str(tmp_path / "u.txt")), tmp_path / "ds", progress=False)
    with pytest.raises(ValueError, match="threads: expected an integer >= 1, got 0"):
        PairsConfig(input="x", threads=0)


def test_a_pipelines_folder_in_the_working_directory_changes_nothing(served, reference, tmp_path):
    """A user's own `pipelines/`, `mixtures/`, `model.py` and `train/` (here: decoys that raise on
    import) must not shadow vpit's modules, in vpit itself or in the img2dataset subprocess."""
    root, info = served
    for name in ("pipelines", "mixtures", "train"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('decoy {name}/ was imported')\n")
        (tmp_path / name / "img2dataset_job.py").write_text("raise SystemExit('decoy job ran')\n")
    (tmp_path / "model.py").write_text("raise ImportError('decoy model.py was imported')\n")
    out = tmp_path / "ds"
    res = subprocess.run(
        vpit_argv(
            "ingest",
            "pairs",
            str(info["url_list"]),
            "-o",
            str(out),
            "--shard-size",
            "10",
            "--threads",
            "8",
            "--workers",
            "1",
        ),
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "decoy" not in res.stdout + res.stderr + (out / "img2dataset" / "img2dataset.log").read_text()
    ref = Dataset(reference[0])
    assert [s.record["id"] for s in Dataset(out)] == [s.record["id"] for s in ref]


def test_the_ray_distributor_downloads_on_the_cluster_vpit_runs_on(served, reference, tmp_path, ray_local):
    """On a cluster (here the test session's local Ray), img2dataset's own Ray distributor runs the
    download shards as Ray tasks; the result is the same dataset as the multiprocessing download."""
    root, info = served
    out, ref_report, _ = reference
    cfg = PairsConfig(input=str(info["url_list"]), shard_size=10, threads=8, distributor="ray")
    report, stats = ingest_pairs(cfg, tmp_path / "ds", workers=2, progress=False)
    assert (report.samples, report.quarantined) == (ref_report.samples, ref_report.quarantined)
    assert stats["shards"] == 3 and stats["successes"] == N + 3
    assert [s["tar_sha256"] for s in Dataset(tmp_path / "ds").shards] == [s["tar_sha256"] for s in Dataset(out).shards]


def test_the_plan_shows_requested_against_arrived_and_names_the_shortfall(reference, tmp_path):
    """URLs that did not arrive are not plannable: the plan says what was asked and what came,
    and a spec asking for more fails naming the shortfall and why."""
    from vpit.errors import ConfigError
    from vpit.mixtures import load_spec, make_plan

    out, report, stats = reference
    requested, arrived = stats["count"], N  # img2dataset successes, less the 3 our checks quarantine
    spec = tmp_path / "spec.yaml"
    for count in (arrived, arrived + 1):
        spec.write_text(f"sources: {{pairs: {{path: {out}, group: generation}}}}\ngroups: {{generation: {count}}}\n")
        if count == arrived:
            table = make_plan(load_spec(spec)).table()
            assert f"pairs: {arrived:,} of {requested:,} arrived" in table, table
        else:
            with pytest.raises(ConfigError) as e:
                make_plan(load_spec(spec))
            assert f"downloaded: {arrived:,} of {requested:,} URLs arrived" in str(e.value)
            assert "download_failed 1" in str(e.value)


def test_estimate_attrition_predicts_the_arrivals_from_a_sample(served, reference, tmp_path):
    from vpit.pipelines.pairs import estimate_attrition

    root, info = served
    _, _, stats = reference
    cfg = PairsConfig(input=str(info["url_list"]), threads=8, estimate_attrition=15)
    e = estimate_attrition(cfg, tmp_path / "est", progress=False)
    assert e["urls"] == stats["count"] and e["sampled"] == 15
    lo, hi = e["predicted_interval"]
    assert lo <= stats["successes"] <= hi and lo < e["predicted"] <= hi
    # the CLI prints it and ingests nothing
    out = tmp_path / "nothing"
    res = subprocess.run(
        vpit_argv("ingest", "pairs", str(info["url_list"]), "-o", str(out), "--estimate-attrition", "10"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "predicted" in res.stdout and f"of {stats['count']:,} URLs will arrive" in res.stdout
    assert not (out / "manifest.json").exists()
