"""The path a researcher runs with a pretrained LLM, rehearsed on CPU: an LLM saved to a local
folder and loaded as users load theirs, built sharded under ZeRO-3, gradient checkpointing that
recomputes, stage 2 from stage 1's export, collectives on the engine's device, launch mistakes,
the attention kernels, and the loss normalised by the global batch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vpit.common import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_llm(tmp_path_factory, bpe_tokenizer) -> Path:
    """A Llama-architecture LLM saved as a Hugging Face folder (weights + tokenizer), with dropout."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def renamed_llm(tmp_path_factory, local_llm) -> Path:
    """The same LLM saved under other tensor names (the bare decoder's, no `model.` prefix), which
    transformers maps and vpit's own sharded loader does not."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("renamed")
    LlamaForCausalLM.from_pretrained(local_llm).model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(local_llm).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory, local_llm) -> Path:
    """An exported folder as stage 1 leaves it, with every weight moved off the LLM's, so that what
    init_from takes (and what it leaves) can be told apart."""
    from vpit.model.build import ModelConfig, build_model, save_exported

    torch.manual_seed(123)
    model, tok = build_model(
        ModelConfig(llm=str(local_llm), chat_template="chatml", vision_dim=32, num_visual_tokens=4)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return save_exported(model, tok, tmp_path_factory.mktemp("stage1") / "export")


@pytest.fixture(scope="module")
def probe(local_llm, stage1_export, renamed_llm, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("probe")
    probe = ROOT / "tests" / "train" / "zero_probe.py"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe)]
        + [str(local_llm), str(stage1_export), str(out), str(renamed_llm)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    facts = [json.loads((out / f"facts-rank{r}.json").read_text()) for r in (0, 1)]
    # the facts that are not this rank's own agree
    assert facts[0]["differ_from_the_plain_build"] == facts[1]["differ_from_the_plain_build"]
    return facts[0] | {
        "gathered_per_rank": [f["elements_gathered_by_each_build"] for f in facts],
        "stderr": res.stderr,
    }


def test_the_model_is_built_sharded_under_zero_init(probe):
    """Defect 3: no rank materialises the whole model. The LLM (read into partitions a parameter at
    a time), the projector and the head are all shards as soon as they exist."""
    assert probe["sharded_at_build"] == {"llm": True, "projector": True, "vision_head": True}
    assert probe["new_rows_are_the_mean"] and probe["new_rows_nonzero"]
    assert probe["shard_dtypes"] == ["torch.float32"]  # fp32 on CPU, never DeepSpeed's guess
    assert probe["differ_from_the_plain_build"] == []  # LLM, new rows and MLPs, bit-equal at world 2


def test_building_gathers_no_parameter_whole(probe):
    """Defect 3, its peak: transformers' ZeRO-3 load gathered every module whole on every rank (to
    initialise it, to copy the checkpoint in, and the embedding again to resize it and to set the
    image rows), so the build's peak was above a plain load's (3.2 vs 2.9 GB per rank at 0.5B,
    bench/rehearsal.py). The checkpoint is read into partitions a parameter at a time, and the new
    rows and init_from's weights are written into partitions: nothing is gathered, on any rank."""
    assert probe["llm_elements"] > 0
    assert probe["gathered_per_rank"] == [[0, 0, 0], [0, 0, 0]]


def test_a_checkpoint_named_otherwise_loads_through_transformers(probe):
    """Names vpit's loader does not know (renamed or fused keys, other formats) go to transformers'
    own ZeRO-3 load, which maps them, with a line that says what it costs; the result is the same."""
    assert probe["renamed_checkpoint_differs_from_the_plain_build"] == []
    assert probe["renamed_build_gathered"] > 0  # transformers' load gathers, and the counter sees it
    assert "loading it through transformers, which gathers each module whole" in probe["stderr"]


def test_a_pretrained_llm_trains_in_train_mode_and_checkpointing_recomputes(probe):
    """Defect 2: from_pretrained returns eval mode, where HF's gradient checkpointing never
    recomputes (1 MLP forward per forward+backward) and dropout is off."""
    assert probe["train_mode_after_build"] and probe["llm_training"]
    assert probe["mlp_forwards_per_forward_backward"] == 2


def test_stage_2_starts_from_stage_1s_projector_head_and_image_rows(probe):
    """Defect 4: model.init_from, under ZeRO-3, bit-equal at step 0; the rest of the LLM is the LLM's."""
    assert probe["init_from_equal"] == {
        "projector": True,
        "vision_head": True,
        "image_rows": True,
        "other_rows_from_the_llm": True,
    }


def test_init_from_names_a_wrong_folder_and_a_wrong_shape(tmp_path, local_llm, stage1_export):
    from vpit.errors import ConfigError
    from vpit.model.build import ModelConfig, build_model

    with pytest.raises(ConfigError, match="not an exported VPiT folder"):
        build_model(ModelConfig(llm=str(local_llm), vision_dim=32, num_visual_tokens=4, init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match="vision_dim=32, this model 64"):
        build_model(ModelConfig(llm=str(local_llm), vision_dim=64, num_visual_tokens=4, init_from=str(stage1_export)))
    # the same tokenizer and dims, another LLM width: refused before anything is written
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wider = tmp_path / "wider"
    tok = AutoTokenizer.from_pretrained(local_llm)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(wider)
    tok.save_pretrained(wider)
    with pytest.raises(
        ConfigError,
        match=r"projector.safetensors: 0\.\w+: shape \[32.*\] into a parameter of shape \[48.*"
        r"exported from another LLM",
    ):
        build_model(ModelConfig(llm=str(wider), vision_dim=32, num_visual_tokens=4, init_from=str(stage1_export)))


_COLLECTIVE_PROBE = """
import sys
from types import SimpleNamespace
import torch, torch.distributed as dist
from vpit.train.parallelize import all_reduce
dist.init_process_group("meta:gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
try:
    dist.all_reduce(torch.zeros(7, dtype=torch.float64))  # what the trainer did before
    print("CPU TENSOR ACCEPTED")
except RuntimeError as e:
    print("REFUSED:", e)
out = all_reduce([1.0, 2.0], SimpleNamespace(device=torch.device("meta")), op="max")
print("HELPER:", out.device.type, out.dtype)
"""


def test_collectives_run_on_the_engines_device(tmp_path):
    """Defect 1: NCCL serves only CUDA tensors. A process group whose only backend serves another
    device type reproduces NCCL's refusal of a CPU tensor on CPU; the trainer's reductions put
    their tensor on the engine's device, which that group accepts. (In a process of its own: the
    default group is one per process.)"""
    res = subprocess.run(
        [sys.executable, "-c", _COLLECTIVE_PROBE, str(tmp_path / "store")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REFUSED: No backend type associated with device type cpu" in res.stdout
    assert "HELPER: meta torch.float64" in res.stdout


def test_the_trainer_reduces_only_through_the_device_aware_helper():
    """Every collective in the trainer and the evaluation goes through parallelize.all_reduce (or
    all_gather_object, which places its buffers itself): no bare torch.distributed.all_reduce."""
    for path in (ROOT / "train" / "trainer.py", ROOT / "train" / "evaluate.py"):
        bare = [
            node.lineno
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute)
            and node.attr in ("all_reduce", "reduce", "broadcast", "all_gather")
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "distributed"
        ]
        assert not bare, f"{path.name}: torch.distributed collectives at lines {bare}"


@pytest.mark.parametrize(
    "env, launcher",
    [
        ({"SLURM_NTASKS": "8"}, "srun"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpirun"),
        ({"LOCAL_WORLD_SIZE": "4"}, "launcher"),
    ],
)
def test_a_multi_process_launch_without_rank_fails_with_what_to_do(tmp_path, env, launcher):
    """Defect 11: several processes started with no RANK used to become N worlds of one."""
    res = subprocess.run(
        [sys.executable, "-m", "vpit", "train", "--set", "max_steps=1", "--set", f"output_dir={tmp_path}/run"],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert launcher in last and "torchrun" in last and "RANK" in last and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "zero",
    [{"offload_param": {"device": "nvme", "nvme_path": "/nvme"}}, {"zero_hpz_partition_size": 8}],
    ids=["nvme", "hpz"],
)
def test_what_the_sharded_build_cannot_do_is_refused(zero):
    """The build partitions a parameter at a time, one zero.Init each: DeepSpeed would make (and
    empty the folder of) an NVMe swapper per parameter, and hpZ's group can be made only once."""
    from vpit.errors import ConfigError
    from vpit.train.parallelize import ds_config, sharded_build

    cfg = ds_config(None, on_gpu=False, micro_batch_size=1, grad_accum=1, world_size=1, grad_clip=1)
    cfg["zero_optimization"].update(zero)
    with pytest.raises(ConfigError, match="not supported by vpit's sharded build.*zero_init: false"):
        with sharded_build(cfg, torch.float32):
            pass


def test_node_local_checkpoint_storage_is_refused(tmp_path):
    from vpit.errors import ConfigError
    from vpit.train.parallelize import ds_config

    cfg = json.loads((ROOT / "infra" / "deepspeed" / "zero3_gpu_bf16.json").read_text())
    cfg["checkpoint"] = {"use_node_local_storage": True}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="use_node_local_storage.*one shared folder"):
        ds_config(str(tmp_path / "ds.json"), on_gpu=True, micro_batch_size=1, grad_accum=1, world_size=8, grad_clip=1)
    for name in ("zero3_cpu.json", "zero3_gpu_bf16.json", "zero3_gpu_bf16_offload.json"):
        text = (ROOT / "infra" / "deepspeed" / name).read_text()
        assert "use_node_local_storage" not in text and "gather_16bit_weights_on_model_save" not in text


def _collator(model, tok, max_len):
    from vpit.model.chat_template import ImageTokens, get_template
    from vpit.train.collate import Collator

    c = model.config
    return Collator(
        tok,
        get_template(c.chat_template),
        ImageTokens(c.image_start_id, c.image_end_id, c.num_visual_tokens),
        c.vision_dim,
        max_len,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_stay_apart_under_each_attention_kernel(attn):
    """Defect 8: model.attn_implementation reaches transformers, and a sample packed after another
    gets the logits it gets alone (position-id resets make the block-diagonal mask)."""
    from vpit.model.build import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        tokenizer="qwen2.5", chat_template="chatml", vision_dim=8, num_visual_tokens=2, attn_implementation=attn
    )
    model, tok = build_model(cfg)
    model.eval()
    assert model.llm.config._attn_implementation == attn
    coll = _collator(model, tok, 256)

    def item(i, text):
        rec = {
            "id": f"s{i}",
            "kind": "text",
            "messages": [
                {"role": "user", "content": [{"text": text}]},
                {"role": "assistant", "content": [{"text": "ok " * (i + 1)}]},
            ],
        }
        return {"id": rec["id"], "source": "t", "group": "g", "record": rec, "tokens": np.zeros((0, 2, 8), np.float32)}

    a, b = item(0, "first sample, a bit longer than the second"), item(1, "second")
    packed, alone = coll([a, b]), coll([b])
    assert packed.input_ids.shape[0] == 1 and packed.sample_ids == ["s0", "s1"]  # both in one row
    with torch.no_grad():
        both = model(**packed.model_inputs(), return_token_losses=True).text_token_loss
        solo = model(**alone.model_inputs(), return_token_losses=True).text_token_loss
    (_, start, end), n = packed.spans[1], alone.spans[0][2]
    assert end - start == n
    torch.testing.assert_close(both[0, start:end], solo[0, :n], atol=1e-5, rtol=0)
    assert float(solo.sum()) > 0


def test_flash_attention_2_is_passed_through(monkeypatch):
    """FA2 cannot run on CPU; the option reaches transformers, which says what is missing."""
    from vpit.model.build import ModelConfig, build_model

    cfg = ModelConfig(tokenizer="qwen2.5", vision_dim=8, num_visual_tokens=2, attn_implementation="flash_attention_2")
    with pytest.raises(Exception, match="(?i)flash"):
        build_model(cfg)


def test_the_loss_is_normalised_by_the_global_batch_so_splits_do_not_matter():
    """Defect 6/7: a step's gradient is (summed losses) / (the global batch's target counts), the
    same however the batch is cut into ranks and micro batches, so a change of GPU count at the
    same global batch keeps the trajectory. Checked here on one process: the gradient of one
    batch of 8 equals the sum of the scaled gradients of its micro batches of 2, 3 and 3."""
    from vpit.model.build import ModelConfig, build_model
    from vpit.train.synthetic import synthetic_items

    torch.manual_seed(0)
    model, tok = build_model(
        ModelConfig(tokenizer="qwen2.5", chat_template="chatml", vision_dim=16, num_visual_tokens=4)
    )
    coll = _collator(model, tok, 512)
    items = synthetic_items(8, m=4, d=16)

    def grads(parts):
        model.zero_grad()
        batches = [coll(p) for p in parts]
        n_text, n_vis = sum(b.n_text for b in batches), sum(b.n_vision for b in batches)
        for b in batches:
            out = model(**b.model_inputs(), return_token_losses=True)
            (out.text_sum / n_text + out.vision_sum / n_vis).backward()
        return torch.cat([p.grad.flatten() for p in model.projector.parameters()])

    whole, split = grads([items]), grads([items[:2], items[2:5], items[5:]])
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-4)
    # the old per-micro-batch mean weighs a micro batch by 1/count, not by its share of the targets
    model.zero_grad()
    for p in (items[:2], items[2:5], items[5:]):
        model(**coll(p).model_inputs()).loss.div(3).backward()
    old = torch.cat([p.grad.flatten() for p in model.projector.parameters()])
    assert not torch.allclose(old, whole, atol=1e-6, rtol=1e-4)


def test_sigterm_checkpoints_at_the_next_step_and_exits_0(tmp_path, bpe_tokenizer):
    """Defect 10: SLURM and Kubernetes send SIGTERM (or SIGUSR1 with --signal) before a kill."""
    import signal
    import time

    from tests.train.conftest import run_vpit
    from vpit.train.checkpoint import complete_checkpoints
    from vpit.train.run_log import read_metrics

    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"""
output_dir: {tmp_path}/run
model: {{llm: tiny, tokenizer: {bpe_tokenizer}, chat_template: chatml, vision_dim: 16, num_visual_tokens: 4}}
data: {{synthetic: 64, max_len: 256, num_workers: 0}}
micro_batch_size: 2
max_steps: 100000
save_every: 100000
""")
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        proc = run_vpit(["train", str(cfg), "--resume"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        before = len(read_metrics(tmp_path / "run"))
        deadline = time.time() + 120
        while time.time() < deadline and len(read_metrics(tmp_path / "run")) < before + 3:
            time.sleep(0.05)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-2000:]
        assert f"stopped by {sig.name} after a checkpoint" in out
        step = complete_checkpoints(tmp_path / "run")[-1][0]
        assert step == len(read_metrics(tmp_path / "run")) and step >= before + 3
    assert "resumed from" in out  # the second run continued the first


def test_tensorboard_events_carry_throughput_losses_per_source_and_group_shares(trained_run):
    """Defect 12: what users watch, beside metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"tokens_per_s", "loss", "text_loss", "vision_loss", "padding_share", "slowest_rank_tokens_ratio"} <= tags
    assert any(t.startswith("text_loss/source/") for t in tags) and any(
        t.startswith("vision_loss/group/") for t in tags
    )
    shares = [t for t in tags if t.startswith("share/")]
    assert {"share/generation", "share/understanding"} <= set(shares)
    last = {t: acc.Scalars(t)[-1].value for t in shares}
    assert abs(sum(last.values()) - 1) < 1e-5


def test_mfu_is_estimated_from_the_peak(tmp_path, bpe_tokenizer):
    from tests.train.conftest import run_vpit
    from vpit.train.run_log import read_metrics

    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"""
output_dir: {tmp_path}/run
model: {{llm: tiny, tokenizer: {bpe_tokenizer}, chat_template: chatml, vision_dim: 16, num_visual_tokens: 4}}
data: {{synthetic: 16, max_len: 256, num_workers: 0}}
micro_batch_size: 2
max_steps: 2
peak_tflops: 0.001
loggers: []
""")
    res = run_vpit(["train", str(cfg)])
    assert res.returncode == 0, res.stderr[-2000:]
    from vpit.train.export import load_checkpoint_model

    last = read_metrics(tmp_path / "run")[-1]
    n_params = sum(p.numel() for p in load_checkpoint_model(tmp_path / "run")[0].parameters())
    # 6 N flops per token (forward + backward) against the stated peak of 1 GFLOP/s
    assert last["mfu"] == pytest.approx(6 * n_params * last["tokens_per_s"] / 1e9, rel=1e-6)


def test_a_universal_checkpoint_does_not_make_every_rank_load_rank_0s_optimizer_shard(tmp_path, trained_run):
    """ds_to_universal copies rank 0's whole optimizer file (its fp32 partition and both Adam
    moments) into universal/zero/optimizer_state.pt, which every resuming rank then loads in full
    only to read the step and the param groups: at 0.5B and world 1 -> 2 that is 6.5 GB more per
    rank, and the rehearsal was OOM-killed there. The re-cut keeps that file to its scalars."""
    import shutil

    from vpit.train.checkpoint import complete_checkpoints, universal_checkpoint

    _, ckpt = complete_checkpoints(trained_run)[-1]
    copy = tmp_path / ckpt.name
    shutil.copytree(ckpt, copy)
    out = universal_checkpoint(copy)
    sd = torch.load(out / "zero" / "optimizer_state.pt", weights_only=False)
    numel = []

    def walk(x):
        if torch.is_tensor(x):
            numel.append(x.numel())
        elif isinstance(x, dict):
            [walk(v) for v in x.values()]
        elif isinstance(x, (list, tuple)):
            [walk(v) for v in x]

    walk(sd)
    params = sum(torch.load(f, weights_only=False).numel() for f in (out / "zero").rglob("fp32.pt"))
    assert sum(numel) < 0.01 * params, (sum(numel), params)
    assert sd["optimizer_state_dict"]["state"][0]["step"] is not None  # what the universal load reads
