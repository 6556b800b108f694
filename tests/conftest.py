"""Shared fixtures. Ray is started once per session, small, with no dashboard."""

from __future__ import annotations

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
