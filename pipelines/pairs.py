"""Image-text pairs (MetaCLIP-style URL lists) -> generation samples, downloaded with img2dataset.

Two steps. `download` runs img2dataset (webdataset output, its own parquet and stats kept) in a
subprocess with a main guard (see `vpit.pipelines.img2dataset_job`): one download process per
CPU by default, or img2dataset's Ray distributor across a cluster when vpit runs on one;
img2dataset's incremental mode makes a stopped download resume at its unfinished shards (no
time limit unless asked for). Each img2dataset tar is deleted once its shard is converted and
recorded, so the download never doubles the disk (`--keep-download` keeps them). `PairsAdapter`
then turns each img2dataset shard into one of our shards: rows sorted by key (img2dataset
writes in completion order), failed downloads quarantined with img2dataset's own error
message, each pair rendered as user "Generate an image of {caption}" (a seeded template
variant) and assistant "Here is an image based on your request:" + the image as target.
An existing img2dataset output folder can be ingested directly.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from vpit import storage
from vpit.common import cluster_cpus, init_ray, raise_if_disk_full, ray_gcs_address, subprocess_env
from vpit.config import path_field
from vpit.errors import ConfigError
from vpit.lock import FolderLock
from vpit.pipelines.ingest import (
    Adapter,
    IngestError,
    IngestReport,
    RawRecord,
    check_adapter_config,
    file_sha256,
    run_ingest,
)
from vpit.pipelines.sample import Rejected, Sample, image_entry
from vpit.pipelines.templates import load_templates

__all__ = ["PairsConfig", "PairsAdapter", "download", "download_stats", "estimate_attrition", "ingest_pairs"]

URL_LIST_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset's own default
_DISALLOWED_MSG = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's message for opt-outs
_IMAGE_EXTS = ("jpg", "png", "webp")
# Fields that change how the job runs but not what it produces: a resume may change them.
_OPERATIONAL = (
    "download_dir",
    "processes",
    "threads",
    "job_timeout_s",
    "distributor",
    "keep_download",
    "estimate_attrition",
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PairsConfig:
    input: str = path_field()
    """A URL list (parquet/CSV/TSV/JSONL) with a URL and a caption column, or an img2dataset output folder."""
    download_dir: str | None = path_field(None)
    """Where img2dataset writes its tars, parquet and stats (set by `ingest_pairs`: OUTPUT/img2dataset)."""
    url_col: str = "url"
    """URL column of the list."""
    caption_col: str = "caption"
    """Caption column of the list."""
    source: str = "pairs"
    """Source name: the prefix of every sample id."""
    shard_size: int = 1000
    """URLs per img2dataset shard, which is also one output shard."""
    image_size: int = 0
    """0 keeps the bytes as served (no re-encoding); N makes img2dataset resize to fit N (keep ratio) as JPEG."""
    respect_opt_out: bool = True
    """Skip images whose X-Robots-Tag says noai/noimageai/noindex/noimageindex (quarantined as download_disallowed)."""
    templates: str | None = path_field(None)
    """Prompt templates YAML; none: the built-in templates/generation.yaml."""
    template_seed: int = 0
    """Seed of the per-sample template choice."""
    max_pixels: int = 64 * 1024 * 1024
    """Images with more pixels are quarantined (decompression-bomb guard)."""
    processes: int | None = None
    """img2dataset download processes; default: this machine's CPUs (with the Ray distributor: the cluster's)."""
    threads: int = 32
    """img2dataset download threads per process."""
    url_timeout_s: int = 10
    """Per-URL download timeout."""
    retries: int = 0
    """Download retries per URL."""
    job_timeout_s: float | None = None
    """Stop img2dataset after this long (a re-run resumes at the unfinished shards); default: no limit."""
    distributor: Literal["auto", "multiprocessing", "ray"] = "auto"
    """img2dataset's distributor: auto = ray when vpit runs on a Ray cluster (--ray-address or
    RAY_ADDRESS; the download folder must be shared), else multiprocessing on this machine."""
    keep_download: bool = False
    """Keep img2dataset's tars after their shards are converted (by default each is deleted once
    its shard is recorded, so the download never needs twice the disk)."""
    estimate_attrition: int = 0
    """N > 0: download only a random sample of N URLs, print how many of the whole list will
    arrive (with a 95% interval) and why the rest fail, and stop: nothing is ingested."""

    def __post_init__(self):
        for name in ("shard_size", "threads", "url_timeout_s", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.processes is not None and self.processes < 1:
            raise ConfigError(f"processes: expected an integer >= 1, got {self.processes}")
        if self.distributor not in ("auto", "multiprocessing", "ray"):
            raise ConfigError(f"distributor: expected auto, multiprocessing or ray, got {self.distributor!r}")
        for name in ("image_size", "retries", "estimate_attrition"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.job_timeout_s is not None and self.job_timeout_s <= 0:
            raise ConfigError(f"job_timeout_s: expected a positive number of seconds, got {self.job_timeout_s}")
        check_adapter_config(self)
        if not self.url_col or not self.caption_col:
            raise ConfigError("url_col, caption_col: expected non-empty column names")


def _url_list_rows(cfg: PairsConfig) -> tuple[str, int]:
    """Validate the URL list and return (img2dataset input_format, number of rows)."""
    import pyarrow.dataset as pads

    path = Path(cfg.input)
    fmt = URL_LIST_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise IngestError(
            f"input: {cfg.input!r} is neither a folder nor a URL list with one of the "
            f"extensions {sorted(URL_LIST_FORMATS)}"
        )
    if fmt == "tsv":
        import pyarrow.csv as pcsv

        ds = pads.dataset(path, format=pads.CsvFileFormat(parse_options=pcsv.ParseOptions(delimiter="\t")))
    else:
        ds = pads.dataset(path, format={"jsonl": "json"}.get(fmt, fmt))
    names = ds.schema.names
    for flag, col in (("--url-col", cfg.url_col), ("--caption-col", cfg.caption_col)):
        if col not in names:
            raise IngestError(f"{path.name}: no column {col!r} ({flag}); the columns are {names}")
    return fmt, ds.count_rows()


def _stats_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*_stats.json"))


def download_stats(folder: Path) -> dict[str, Any]:
    """img2dataset's per-shard stats, summed: counts and the most frequent error messages."""
    total: Counter = Counter()
    errors: Counter = Counter()
    for path in _stats_files(folder):
        stats = json.loads(path.read_text())
        total.update({k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
        errors.update({k: v for k, v in stats.get("status_dict", {}).items() if k != "success"})
    return {
        **{k: total[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")},
        "shards": len(_stats_files(folder)),
        "errors": dict(errors.most_common(5)),
    }


def _distributor(cfg: PairsConfig, ray_address: str | None) -> tuple[str, int]:
    """(img2dataset distributor, processes): Ray across the cluster vpit runs on, else local processes."""
    address = ray_address or os.environ.get("RAY_ADDRESS")
    use_ray = cfg.distributor == "ray" or (cfg.distributor == "auto" and bool(address))
    if not use_ray:
        return "multiprocessing", cfg.processes or cluster_cpus()
    init_ray(address)
    return "ray", cfg.processes or cluster_cpus()


def download(cfg: PairsConfig, folder: Path, progress: bool = True, ray_address: str | None = None) -> dict[str, Any]:
    """Download the URL list into `folder` with img2dataset, resuming a partial run; return its stats."""
    from tqdm import tqdm

    fmt, rows = _url_list_rows(cfg)
    expected = math.ceil(rows / cfg.shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    if len(_stats_files(folder)) < expected:
        distributor, processes = _distributor(cfg, ray_address)
        kwargs = dict(
            url_list=str(Path(cfg.input).resolve()),
            output_folder=str(folder.resolve()),
            output_format="webdataset",
            input_format=fmt,
            url_col=cfg.url_col,
            caption_col=cfg.caption_col,
            number_sample_per_shard=cfg.shard_size,
            distributor=distributor,
            processes_count=processes,
            thread_count=cfg.threads,
            timeout=cfg.url_timeout_s,
            retries=cfg.retries,
            incremental_mode="incremental",
            enable_wandb=False,
            extract_exif=False,
            compute_hash="sha256",
            # An empty list is how img2dataset turns the opt-out check off.
            disallowed_header_directives=OPT_OUT_DIRECTIVES if cfg.respect_opt_out else [],
        )
        if cfg.image_size:
            kwargs.update(
                image_size=cfg.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg"
            )
        else:  # keep bytes as served: our own decode check then sees truncated or non-image bodies
            kwargs.update(disable_all_reencoding=True, resize_mode="no")
        address = ray_address or os.environ.get("RAY_ADDRESS") if distributor == "ray" else None
        _run_job(kwargs, folder, expected, cfg.job_timeout_s, progress and tqdm, address)
    done = len(_stats_files(folder))
    if done < expected:
        raise IngestError(
            f"img2dataset finished {done} of {expected} shards in {folder} (see {folder}/img2dataset.log); "
            "re-run the same command to retry the rest"
        )
    return download_stats(folder)


def _run_job(
    kwargs: dict[str, Any], folder: Path, expected: int, timeout_s: float | None, tqdm, ray_address: str | None
) -> None:
    env = subprocess_env()
    if kwargs["distributor"] == "ray":  # the job joins the cluster this vpit runs on
        env["RAY_ADDRESS"] = ray_address or ray_gcs_address()
    cmd = [sys.executable, "-m", "vpit.pipelines.img2dataset_job", json.dumps(kwargs), str(os.getpid())]
    log_path = folder / "img2dataset.log"
    bar = (
        tqdm(total=expected, initial=len(_stats_files(folder)), desc="download (img2dataset)", unit="shard")
        if tqdm
        else None
    )
    with open(log_path, "ab") as log:
        # Own session: on timeout or Ctrl-C the whole tree (pool, logger process) is killed at once.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise IngestError(
                        f"img2dataset did not finish within {timeout_s:.0f}s (job_timeout_s); "
                        f"finished shards are kept: re-run to resume (log: {log_path})"
                    )
                time.sleep(0.2)
                if bar is not None and len(_stats_files(folder)) > bar.n:
                    bar.update(len(_stats_files(folder)) - bar.n)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if bar is not None:
                bar.update(len(_stats_files(folder)) - bar.n)
                bar.close()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # the machine, not the input: say it so
            if any(f"[Errno {code}]" in line for line in tail):
                raise OSError(code, os.strerror(code), str(folder))
        raise_if_disk_full(folder)  # full before even the log could say so
        raise IngestError(
            f"img2dataset failed (exit code {proc.returncode}); last lines of {log_path}:\n" + "\n".join(tail)
        )


class PairsAdapter(Adapter):
    """An img2dataset webdataset output folder -> generation samples; one shard per img2dataset shard."""

    source_kind = "pairs"

    def __init__(self, config: PairsConfig, folder: Path, owns_download: bool = False):
        self.config = config
        self.folder = Path(folder)
        self.owns_download = owns_download  # vpit downloaded it: its tars may go once converted
        self.templates = load_templates(config.templates)
        if not self.folder.is_dir():
            raise IngestError(f"{self.folder} is not a folder")

    def _shards(self) -> list[str]:
        names = sorted(p.stem for p in self.folder.glob("*.parquet"))
        if not names:
            raise IngestError(f"{self.folder} holds no img2dataset shards (NNNNN.parquet + NNNNN.tar)")
        for name in names:
            if not (self.folder / f"{name}_stats.json").is_file():
                raise IngestError(
                    f"{self.folder}: shard {name} has no {name}_stats.json, so img2dataset did not "
                    "finish it; re-run img2dataset on that folder first"
                )
        return names

    def input_fingerprint(self) -> str:
        if Path(self.config.input).is_file():
            return file_sha256(Path(self.config.input))
        h = hashlib.sha256()
        for name in self._shards():
            h.update(
                f"{name}:{file_sha256(self.folder / f'{name}.parquet')}:"
                f"{(self.folder / f'{name}.tar').stat().st_size}".encode()
            )
        return h.hexdigest()

    def shard_done(self, task: dict[str, Any]) -> None:
        """Free the disk of a converted shard's img2dataset tar (its parquet and stats stay: they
        are small, and img2dataset's resume and our attrition report read them)."""
        if self.owns_download and not self.config.keep_download:
            (self.folder / f"{task['shard']}.tar").unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in _OPERATIONAL}
        return {"adapter": self.source_kind, **fields, "templates_sha256": self.templates.sha256}

    def plan(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        tasks, first = [], 0
        for name in self._shards():
            n = pq.ParquetFile(self.folder / f"{name}.parquet").metadata.num_rows
            if n:
                tasks.append({"records": [first, first + n], "shard": name})
            first += n
        return tasks

    def read(self, task: dict[str, Any]) -> Iterator[RawRecord]:
        import pyarrow.parquet as pq

        name = task["shard"]
        if not (self.folder / f"{name}.tar").is_file():
            raise IngestError(
                f"{self.folder}/{name}.parquet has no {name}.tar: ingest needs img2dataset's webdataset output "
                "(output_format=webdataset); if vpit deleted it after converting, the shard is recorded and "
                "needs no redo, so the dataset itself changed: delete the img2dataset folder and re-run"
            )
        rows = sorted(pq.read_table(self.folder / f"{name}.parquet").to_pylist(), key=lambda r: r["key"])
        images: dict[str, bytes] = {}
        with tarfile.open(self.folder / f"{name}.tar") as tar:
            for info in tar:
                # img2dataset writes flat regular files: anything else is not its output, and a
                # link or a path is how a hostile tar escapes its folder (nothing is extracted here)
                if not info.isreg() or "/" in info.name or info.name.startswith(".."):
                    what = "a link" if info.issym() or info.islnk() else "a folder" if info.isdir() else "a path"
                    raise IngestError(
                        f"{self.folder}/{name}.tar holds a hostile member {info.name!r} ({what}); img2dataset "
                        "writes plain files named KEY.EXT: check where this tar came from"
                    )
                key, _, ext = info.name.partition(".")
                if ext in _IMAGE_EXTS:
                    images[key] = tar.extractfile(info).read()
        first = task["records"][0]
        for j, row in enumerate(rows):
            origin = {
                "uri": row.get("url"),
                "record": first + j,
                "img2dataset_shard": f"{name}.tar",
                "img2dataset_key": row["key"],
            }
            yield RawRecord(first + j, origin, {"meta": row, "image": images.get(row["key"])})

    def convert(self, rec: RawRecord) -> Sample:
        cfg = self.config
        meta, data = rec.raw["meta"], rec.raw["image"]
        url = meta.get("url")
        if meta.get("status") != "success":
            msg = meta.get("error_message") or meta.get("status")
            if msg == _DISALLOWED_MSG:
                raise Rejected("download_disallowed", f"url {url}: {msg}")
            if meta.get("status") == "failed_to_resize":
                raise Rejected("unreadable_image", f"url {url}: img2dataset could not decode it: {msg}")
            raise Rejected("download_failed", f"url {url}: {msg}")
        if data is None:
            raise Rejected("download_failed", f"url {url}: img2dataset reports success but its tar holds no image")
        caption = meta.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise Rejected("missing_field", f"{cfg.caption_col} (caption) of url {url} is empty: {caption!r}")
        caption = caption.strip()
        entry = image_entry(0, data, f"image from {url}", cfg.max_pixels)
        key = self.key(rec)
        prompt = self.templates.user("generation", key, cfg.template_seed, caption=caption)
        record = {
            "id": f"{cfg.source}:{rec.index:09d}",
            "source": cfg.source,
            "kind": "generation",
            "caption": caption,
            "messages": [
                {"role": "user", "content": [{"text": prompt}]},
                {"role": "assistant", "content": [{"text": self.templates.assistant("generation")}, {"image": 0}]},
            ],
            "images": [entry],
            "origin": rec.origin,
        }
        return Sample(record=record, images=[data])


def ingest_pairs(
    config: PairsConfig,
    output: str | Path,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    card: dict[str, str | None] | None = None,
) -> tuple[IngestReport, dict[str, Any]]:
    """Download (when the input is a URL list) and ingest; return the ingest report and img2dataset's stats.
    To an `output` URL (s3://...) the download goes to the output's local staging folder."""
    local = storage.staging_dir(str(storage.as_root(output))) if storage.is_remote(output) else Path(output)
    with FolderLock(local, "vpit ingest pairs"):  # the download writes into the output folder too
        return _ingest_pairs(
            config, output, local, workers=workers, ray_address=ray_address, progress=progress, card=card
        )


def _ingest_pairs(
    config: PairsConfig,
    output: str | Path,
    local: Path,
    *,
    workers: int | None,
    ray_address: str | None,
    progress: bool,
    card: dict[str, str | None] | None = None,
) -> tuple[IngestReport, dict[str, Any]]:
    src = Path(config.input)
    if src.is_dir():
        folder, owns = src, False
    elif src.is_file():
        folder = Path(config.download_dir) if config.download_dir else local / "img2dataset"
        config = dataclasses.replace(config, download_dir=str(folder))
        download(config, folder, progress=progress, ray_address=ray_address)
        owns = True
    else:
        raise IngestError(f"input: {config.input!r} does not exist")
    report = run_ingest(
        PairsAdapter(config, folder, owns),
        output,
        workers=workers,
        ray_address=ray_address,
        progress=progress,
        card=card,
    )
    return report, download_stats(folder)


def estimate_attrition(config: PairsConfig, work: Path, progress: bool = True) -> dict[str, Any]:
    """Download a seeded random sample of `config.estimate_attrition` URLs of the list into `work`
    and predict the whole list's arrivals: the sample's success rate (Wilson 95% interval) times
    the list's length. Web attrition is real (a 2026 CC12M download got 63.7%), and a mixture
    spec sized on the URL count would be infeasible."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    fmt, rows = _url_list_rows(config)
    n = min(config.estimate_attrition, rows)
    if fmt == "tsv":
        import pyarrow.csv as pcsv

        ds = pads.dataset(config.input, format=pads.CsvFileFormat(parse_options=pcsv.ParseOptions(delimiter="\t")))
    else:
        ds = pads.dataset(config.input, format={"jsonl": "json"}.get(fmt, fmt))
    picks = np.sort(np.random.default_rng(config.template_seed).choice(rows, size=n, replace=False))
    table = ds.take(pa.array(picks), columns=[config.url_col, config.caption_col])  # only the sampled rows
    work.mkdir(parents=True, exist_ok=True)
    sample = work / "sample.parquet"
    pq.write_table(table, sample)
    sample_cfg = dataclasses.replace(config, input=str(sample), shard_size=max(1, math.ceil(n / 8)))
    stats = download(sample_cfg, work / "img2dataset", progress=progress)
    rate = stats["successes"] / max(1, stats["count"])
    z = 1.96  # Wilson score interval: sound at small samples and rates near 0 or 1
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {
        "urls": rows,
        "sampled": n,
        "arrived": stats["successes"],
        "rate": rate,
        "interval": (max(0.0, centre - half), min(1.0, centre + half)),
        "predicted": round(rate * rows),
        "predicted_interval": (round(max(0.0, centre - half) * rows), round(min(1.0, centre + half) * rows)),
        "errors": stats["errors"],
    }
