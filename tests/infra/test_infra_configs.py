"""Every file under infra/ is checked by the tool that will read it, as far as that works offline:
DeepSpeed's own config classes, Ray's cluster-launcher schema, DeepSpeed's hostfile parser,
`bash -n`, and our own CLI parser for every `vpit` command the manifests run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
GPU_CONFIGS = ["zero3_gpu_bf16.json", "zero3_gpu_bf16_offload.json"]
# MetaMorph's and Cambrian/LLaVA's scripts/zero3.json, with HF's 'auto' resolved for hidden size 4096.
REFERENCE_ZERO3 = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "sub_group_size": 1e9,
    "reduce_bucket_size": 4096 * 4096,
    "stage3_prefetch_bucket_size": int(0.9 * 4096 * 4096),
    "stage3_param_persistence_threshold": 10 * 4096,
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
}


def _ds_config(path: Path):
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig({k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")})


def test_every_yaml_under_infra_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {f.relative_to(INFRA).as_posix() for f in files} >= {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "ray/cluster.yaml",
    }
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f


def test_every_deepspeed_json_loads_with_deepspeeds_config_class():
    files = sorted((INFRA / "deepspeed").glob("*.json"))
    assert {f.name for f in files} >= set(GPU_CONFIGS)
    for f in files:
        cfg = _ds_config(f)
        assert cfg.zero_optimization_stage == 3, f.name


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_zero3_configs_carry_the_reference_values(name):
    raw = json.loads((INFRA / "deepspeed" / name).read_text())
    zero = raw["zero_optimization"]
    for key, value in REFERENCE_ZERO3.items():
        assert zero[key] == value, f"{name}: zero_optimization.{key}"
    cfg = _ds_config(INFRA / "deepspeed" / name)
    assert cfg.bfloat16_config.enabled and not cfg.float16_config.enabled
    assert cfg.zero_config.prefetch_bucket_size == REFERENCE_ZERO3["stage3_prefetch_bucket_size"]
    # vpit exports through zero_to_fp32, so nothing asks DeepSpeed to gather 16-bit weights on save,
    # and a checkpoint is one shared folder (node-local storage would split it)
    assert not cfg.zero_config.gather_16bit_weights_on_model_save and "checkpoint" not in raw
    offload = cfg.zero_config.offload_optimizer
    if "offload" in name:
        assert offload is not None and offload.device == "cpu" and offload.pin_memory
        assert raw["optimizer"]["type"] == "AdamW"  # offload needs DeepSpeed's own (CPU) Adam
    else:
        assert offload is None or offload.device == "none"


def test_a_typo_in_a_zero_key_is_refused():
    """The check above is only worth something if DeepSpeed rejects what it does not know."""
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((INFRA / "deepspeed" / GPU_CONFIGS[0]).read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    raw["zero_optimization"]["stage3_prefetch_bucket_sise"] = 1
    with pytest.raises(Exception, match="stage3_prefetch_bucket_sise"):
        DeepSpeedConfig(raw)


def test_hostfile_example_parses_with_deepspeeds_launcher():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(INFRA / "deepspeed" / "hostfile.example"))
    assert list(hosts.items()) == [(f"gpu-node-0{i}", 8) for i in range(1, 5)]


def test_ray_up_cluster_yaml_passes_rays_own_validation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # with the launcher's defaults filled in, as `ray up` does
    assert config["head_node_type"] in config["available_node_types"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_worker": 3}, schema)


def _kuberay_docs() -> dict[str, dict]:
    docs = {}
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for d in yaml.safe_load_all((INFRA / "kuberay" / name).read_text()):
            docs[d["kind"]] = d
    return docs


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_kuberay_manifests_have_the_shape_kuberay_expects():
    import ray

    docs = _kuberay_docs()
    assert set(docs) == {"RayCluster", "RayJob", "PersistentVolumeClaim"}
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for spec in (docs["RayCluster"]["spec"], docs["RayJob"]["spec"]["rayClusterSpec"]):
        assert docs["RayCluster"]["apiVersion"] == docs["RayJob"]["apiVersion"] == "ray.io/v1"
        # The cluster's Ray must be the client's: a Ray client cannot join a cluster of another version.
        assert spec["rayVersion"] == ray.__version__
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        for pod in _pod_specs(spec):
            mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
            assert mounts["data"] == "/data"
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim
            for c in pod["containers"]:
                assert ray.__version__ in c["image"]
    gpu_groups = [
        g
        for g in docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "the job's cluster needs GPU workers for precompute and training"


def _vpit_commands(text: str) -> list[list[str]]:
    """Every `vpit ...` command in a shell text, as argv (variables replaced by placeholders)."""
    out = []
    for chunk in re.split(r"[;\n]|&&", text):
        chunk = chunk.strip().strip("'")
        if chunk.startswith("vpit "):
            chunk = chunk.replace('"$@"', "")  # pass-through arguments: none
            out.append(shlex.split(re.sub(r'"?\$\{?(\w+)\}?"?', r"\1", chunk))[1:])
    return out


def _parse(argv: list[str]):
    """argv as `vpit` parses it; a leaf command must be reached (argparse exits on anything else)."""
    from vpit.cli import build_parser

    args = build_parser(argv[0]).parse_args(argv)
    assert args._command is not None
    return args


def test_every_vpit_command_in_the_manifests_parses_with_our_cli():
    entrypoint = _kuberay_docs()["RayJob"]["spec"]["entrypoint"]
    commands = _vpit_commands(entrypoint)
    assert [c[0] for c in commands] == ["ingest", "precompute", "grid"]
    commands += _vpit_commands((INFRA / "slurm" / "ray_grid.sh").read_text())
    for argv in commands:
        _parse(argv)
    assert len(commands) >= 5  # ingest, precompute, grid run (twice), grid report


@pytest.mark.parametrize(
    "argv",
    [["gird", "report", "g.yaml"], ["grid", "reprot", "g.yaml"], ["ingest", "llava", "x.jsonl", "--image-rot", "r"]],
)
def test_a_mistyped_vpit_command_fails_to_parse(argv):
    with pytest.raises(SystemExit):
        _parse(argv)


@pytest.mark.parametrize("script", sorted(p.name for p in (INFRA / "slurm").glob("*.sh")))
def test_slurm_scripts_pass_bash_n(script, tmp_path):
    path = INFRA / "slurm" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "#SBATCH --nodes=" in text and "set -euo pipefail" in text
    assert os.access(path, os.X_OK)
    bad = tmp_path / script  # and bash -n does fail on a broken script
    bad.write_text(text + "\nif true; then\n")
    assert subprocess.run(["bash", "-n", str(bad)], capture_output=True).returncode != 0


def test_the_deepspeed_launch_line_parses_with_our_cli():
    """What `deepspeed --module vpit decoder train ...` runs on every rank, --local_rank included."""
    text = (INFRA / "slurm" / "deepspeed_decoder.sh").read_text()
    assert "--module vpit decoder train" in text
    args = _parse(
        [
            "decoder",
            "train",
            "/data/datasets/metaclip",
            "--cache",
            "0123abcd",
            "--output",
            "/data/decoders/sd15",
            "--local_rank=3",
        ]
    )
    assert (args.command, args.action, args.local_rank) == ("decoder", "train", 3)


def test_the_slurm_training_script_trains_two_ranks_through_srun_and_torchrun(tmp_path):
    """infra/slurm/train.sh run as sbatch would run it on one node with two "GPUs": `srun` and
    `scontrol` are stand-ins (srun runs its command once, as on a one-node allocation); torchrun
    and the trainer are real, and the two ranks meet at the c10d rendezvous the script names."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    (fake / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path}/run\nmodel: {{llm: tiny, tokenizer: qwen2.5, vision_dim: 8, num_visual_tokens: 2,"
        " hidden_size: 16, num_heads: 2, intermediate_size: 32, num_layers: 1}\n"
        "data: {synthetic: 16, max_len: 128, num_workers: 0}\nmicro_batch_size: 1\nmax_steps: 2\nloggers: []\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        PATH=f"{fake}:{env['PATH']}",
        VPIT_VENV=sys.prefix,
        SLURM_JOB_ID="4242",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="node01",
        SLURM_GPUS_PER_NODE="2",
        SLURM_SUBMIT_DIR=str(tmp_path),
        OMP_NUM_THREADS="1",
    )
    res = subprocess.run(
        ["bash", str(INFRA / "slurm" / "train.sh"), str(cfg)], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "vpit-train: 1 nodes x 2 GPUs" in res.stdout and "trained 2 steps (global batch 2" in res.stdout
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/vpit_state.json")).read_text())
    assert state["world_size"] == 2
