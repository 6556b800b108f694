"""Real shards with a real token cache (tiny SigLIP, fp16), built once per session."""

from __future__ import annotations

import pytest

from tests.mixtures.helpers import make_dataset

U, T, G, E = "understanding", "text", "generation", "editing"


@pytest.fixture(scope="session")
def mix_data(ray_local, tmp_path_factory) -> dict:
    """`mix`: 84 samples in 6 shards, two of which mix kinds (so `kind` filters read the
    index): 49 understanding, 5 text, 20 generation, 10 editing; with a token cache.
    `extra`: 10 generation samples, no cache. One precompute only: each is a Ray job.
    """
    from vpit.model.encoder import EncoderConfig
    from vpit.pipelines.precompute import PrecomputeConfig, run_precompute

    root = tmp_path_factory.mktemp("mix")
    mix = make_dataset(root / "mix", "mix", [[U] * 20, [U, U, T] * 5, [U] * 10, [G] * 12, [G, G, U] * 4, [E] * 10])
    extra = make_dataset(root / "extra", "extra", [[G] * 6, [G] * 4], seed=2)
    report = run_precompute(
        mix, EncoderConfig(encoder="tiny", tokens=4), PrecomputeConfig(batch_size=64, actors=1), progress=False
    )
    return {"root": root, "mix": mix, "extra": extra, "fingerprint": report.fingerprint}


def spec_text(
    fp: str | None, und: int = 30, gen: int = 16, edit: int = 6, seed: int = 0, repetition: str = "error"
) -> str:
    """A spec over the `mix` dataset (paths relative to the spec file in the data root)."""
    return f"""
seed: {seed}
repetition: {repetition}
cache: {fp or "null"}
sources:
  vqa: {{path: mix, group: understanding, kind: understanding}}
  chat: {{path: mix, group: understanding, kind: text}}
  pairs: {{path: mix, group: generation, kind: generation}}
  edits: {{path: mix, group: editing, kind: editing}}
groups:
  understanding: {und}
  generation: {gen}
  editing: {edit}
"""
