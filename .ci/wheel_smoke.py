"""CI: the built wheel, installed (not editable) in a fresh venv, run from a folder whose decoy
`pipelines/`, `mixtures/`, `model.py` and `train/` raise on import. Nothing of vpit may load them.

    python .ci/wheel_smoke.py VENV WORKDIR
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(venv: Path, work: Path) -> int:
    work.mkdir(parents=True, exist_ok=True)
    for name in ("pipelines", "mixtures", "train"):
        (work / name).mkdir(exist_ok=True)
        (work / name / "__init__.py").write_text(f"raise ImportError('decoy {name}/ was imported')\n")
    (work / "model.py").write_text("raise ImportError('decoy model.py was imported')\n")
    python, vpit = venv / "bin" / "python", venv / "bin" / "vpit"

    def run(*args: str) -> str:
        print("+ vpit " + " ".join(args), flush=True)
        proc = subprocess.run([str(vpit), *args], cwd=work, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or "was imported" in proc.stderr + proc.stdout:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            raise SystemExit(f"wheel smoke: `vpit {' '.join(args)}` failed (exit {proc.returncode})")
        return proc.stdout

    run("--help")
    # Data from the installed package's own generators, written from the decoy folder.
    gen = "from vpit.demo.corpora import write_llava_dataset; write_llava_dataset('raw', 40, seed=1)"
    subprocess.run([str(python), "-c", gen], cwd=work, check=True)
    run("ingest", "llava", "raw/data.jsonl", "--image-root", "raw", "-o", "ds-llava", "--shard-size", "20")
    server = subprocess.Popen(
        [
            str(python),
            "-c",
            "import time\nfrom vpit.demo.corpora import serve_http, write_pairs\n"
            "with serve_http('web/www') as base:\n    write_pairs('web', 12, base, seed=2)\n"
            "    print(base, flush=True)\n    time.sleep(600)\n",
        ],
        cwd=work,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server.stdout.readline()  # the URL list is written once the server is up
        run("ingest", "pairs", "web/urls.parquet", "-o", "ds-pairs", "--shard-size", "8", "--threads", "2")
    finally:
        server.kill()
    (work / "mix.yaml").write_text(
        "sources:\n  vqa: {path: ds-llava, group: understanding, kind: understanding}\n"
        "  pairs: {path: ds-pairs, group: generation}\ngroups:\n  understanding: 20\n  generation: 8\n"
    )
    out = run("mix", "plan", "mix.yaml")
    assert "plan hash" in out, out
    out = run("train", "--set", "max_steps=2", "--set", "output_dir=run")
    assert "trained 2 steps" in out, out
    print("wheel smoke: every command ran from a folder of decoys", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
