"""Shared fixtures. Ray is started once per session, small, with no dashboard."""

from __future__ import annotations

import hashlib
import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by every test that needs one (starting one costs seconds)."""
    import ray

    from vpit.common import init_ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024 * 1024)
    init_ray(None)  # applies our quiet Ray Data settings
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 (moto's server mode on 127.0.0.1), reached through the standard AWS variables
    only, as a user's cluster would be. Yields those variables; each test makes its own bucket."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path, request):
    """A fresh bucket on the local S3, this process's environment pointing at it, and a node
    cache of this test's own. Yields (bucket URL, environment for subprocesses)."""
    import fsspec

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VPIT_CACHE_DIR", str(tmp_path / "node-cache"))
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    bucket = "vpit-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    fs.mkdir(bucket)
    yield f"s3://{bucket}", {**os.environ}
