"""One shortened `vpit demo` per test session, shared by the demo test and the browser test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, ray_local) -> dict:
    """Run the whole demo (every stage, less data and fewer steps) once; return its result and stdout."""
    import contextlib
    import io

    from vpit.demo.run import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    cfg = DemoConfig.quick(decoder_steps=40)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run_demo(out, cfg)
    return {"out": out, "config": cfg, "stdout": buf.getvalue(), **result}
