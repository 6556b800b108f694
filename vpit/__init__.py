"""vpit: the data side of Visual-Predictive Instruction Tuning (MetaMorph, arXiv 2412.14164).

Stages, each a subpackage: `vpit.pipelines` (ingest, shards, token cache), `vpit.mixtures`
(specs, plans, the deterministic stream), `vpit.model` (encoder wrapper, VPiT model),
`vpit.train` (the ZeRO-3 trainer, evaluation), `vpit.decoder` (tokens -> pixels),
`vpit.grid` (mixture ablation grids), `vpit.demo` (the end-to-end demo and its corpora).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vpit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"
