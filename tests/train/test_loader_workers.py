"""The trainer's loader workers stop when its step stream is closed, whatever still references it.

Workers ignore SIGTERM (pre-emption must reach the trainer, not kill a worker), so a worker left
running at exit hangs the process forever: Python's multiprocessing joins it. Found when a
reference cycle (a pyparsing exception kept by matplotlib while the loss curve was drawn) held the
training loop's frame, so the DataLoader iterator was never freed before exit and both
`test_resume` runs at world size 2 hung after their last step.
"""

from __future__ import annotations

import multiprocessing as mp
import time

from vpit.train.data import MixtureSource


class _Items:
    """A collate that hands a step's items back as they are (picklable for the worker)."""

    def step(self, items, micro_batches):
        return items


def test_closing_the_step_stream_stops_its_loader_workers_while_a_reference_cycle_holds_it(train_mixture):
    before = set(mp.active_children())
    source = MixtureSource(train_mixture["spec"], {}, 12)
    steps = source.steps(0, 0, 1, 1, _Items(), num_workers=1)
    assert len(next(steps)) == 12
    workers = [p for p in mp.active_children() if p not in before]
    assert len(workers) == 1 and workers[0].is_alive()
    held = [steps]
    held.append(held)  # a cycle: only a garbage collection would free it
    steps.close()
    deadline = time.monotonic() + 20
    while workers[0].is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not workers[0].is_alive(), "the loader worker outlived its closed stream"
