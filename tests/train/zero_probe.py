"""Run by test_real_runs.py under torchrun at world size 2 (a world under DeepSpeed ZeRO-3 must not
live in the pytest process): builds the model the way the trainer does, from an LLM saved to a
local folder, and writes OUT_DIR/facts-rankR.json for the tests to check.

    torchrun --nproc_per_node 2 tests/train/zero_probe.py LLM_DIR EXPORT_DIR OUT_DIR RENAMED_LLM_DIR
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _differing(sharded, plain) -> list[str]:
    """The parameters of a sharded model that, gathered, are not bit-equal to the plain model's."""
    import deepspeed
    import torch

    differ = []
    for name, param in sharded.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if not torch.equal(param, plain.get_parameter(name)):
                differ.append(name)
    return differ


def main(llm_dir: str, export_dir: str, out_dir: str, renamed_llm_dir: str) -> None:
    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus
    from safetensors.torch import load_file

    import vpit.train.trainer as trainer_module

    # Every element DeepSpeed gathers whole on this rank (GatheredParameters, transformers' ZeRO-3
    # load and resize, forward passes): what building the model must not do.
    gathered = [0]
    all_gather = Init._all_gather

    def counting_all_gather(self, param_list, *args, **kwargs):
        gathered[0] += sum(p.ds_numel for p in param_list if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
        return all_gather(self, param_list, *args, **kwargs)

    Init._all_gather = counting_all_gather
    builds = []

    def counting_build(*args, **kwargs):
        before = gathered[0]
        out = build_model(*args, **kwargs)
        builds.append(gathered[0] - before)
        return out

    trainer_module.build_model = counting_build

    from vpit.model.build import ModelConfig, build_model
    from vpit.train.config import DataConfig, TrainConfig
    from vpit.train.parallelize import ds_config, sharded_build
    from vpit.train.trainer import Trainer

    facts: dict = {}
    model_cfg = ModelConfig(llm=llm_dir, chat_template="chatml", vision_dim=32, num_visual_tokens=4)
    cfg = TrainConfig(
        output_dir=str(Path(out_dir) / "run"),
        model=model_cfg,
        data=DataConfig(synthetic=32, max_len=128, num_workers=0),
        micro_batch_size=2,
        max_steps=1,
        gradient_checkpointing=True,
        loggers=(),
    )
    trainer = Trainer(cfg)  # joins the world torchrun made; a sharded build, no init_from

    # 1. zero.Init: right after the build, before deepspeed.initialize, every parameter is a shard
    ds = ds_config(
        None,
        on_gpu=False,
        micro_batch_size=2,
        grad_accum=1,
        world_size=torch.distributed.get_world_size(),
        grad_clip=1.0,
    )
    torch.manual_seed(7)
    with sharded_build(ds, torch.float32) as sharding:
        model, tok = counting_build(model_cfg, torch.float32, sharding)
    torch.manual_seed(7)
    plain, _ = build_model(model_cfg, torch.float32)
    parts = {"llm": model.llm, "projector": model.projector, "vision_head": model.vision_head}
    facts["sharded_at_build"] = {
        name: all(hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in m.parameters())
        for name, m in parts.items()
    }
    # the shards hold the dtype asked for (DeepSpeed's own default made bf16 ones on some CPUs)
    facts["shard_dtypes"] = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
    facts["train_mode_after_build"] = model.training and model.llm.training
    # the sharded build is the plain build, partitioned: every parameter bit-equal once gathered
    facts["differ_from_the_plain_build"] = _differing(model, plain)

    # a checkpoint named otherwise (here: the bare decoder's names) is left to transformers' load
    renamed_cfg = dataclasses.replace(model_cfg, llm=renamed_llm_dir)
    torch.manual_seed(7)
    with sharded_build(ds, torch.float32) as sharding:
        before = gathered[0]
        renamed, _ = build_model(renamed_cfg, torch.float32, sharding)
        facts["renamed_build_gathered"] = gathered[0] - before  # the counter's positive control
    torch.manual_seed(7)
    renamed_plain, _ = build_model(renamed_cfg, torch.float32)
    facts["renamed_checkpoint_differs_from_the_plain_build"] = _differing(renamed, renamed_plain)
    emb = model.llm.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([emb]):
        n_old = len(tok) - 2
        mean = emb[:n_old].mean(0)
        ids = [model.config.image_start_id, model.config.image_end_id]
        facts["new_rows_are_the_mean"] = all(bool(torch.allclose(emb[i], mean, atol=1e-6)) for i in ids)
        facts["new_rows_nonzero"] = all(float(emb[i].abs().sum()) > 0 for i in ids)

    # 2. gradient checkpointing recomputes: the first decoder layer's MLP runs twice per micro batch
    engine = trainer.engine
    calls = []
    # a pre-hook: torch stops a recompute as soon as the saved tensors are back, before forward hooks
    engine.module.llm.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    micro = next(trainer.source.steps(0, 0, 1, 1, trainer.collate, 0))
    trainer.engine.train()
    trainer.train_step(micro)
    facts["mlp_forwards_per_forward_backward"] = len(calls)
    facts["llm_training"] = engine.module.llm.training

    # 3. init_from: the stage-2 trainer's live (sharded) model at step 0 holds stage 1's MLPs and rows
    cfg2 = TrainConfig(
        output_dir=str(Path(out_dir) / "run2"),
        model=ModelConfig(
            llm=llm_dir, chat_template="chatml", vision_dim=32, num_visual_tokens=4, init_from=export_dir
        ),
        data=DataConfig(synthetic=32, max_len=128, num_workers=0),
        micro_batch_size=2,
        max_steps=1,
        seed=99,  # another seed: only init_from can make them equal
        loggers=(),
    )
    live = Trainer(cfg2).engine.module
    equal = {}
    for name in ("projector", "vision_head"):
        saved = load_file(str(Path(export_dir) / f"{name}.safetensors"))
        module = getattr(live, name)
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            equal[name] = all(torch.equal(module.get_parameter(k), v) for k, v in saved.items())
    exported = load_file(str(Path(export_dir) / "model.safetensors"))["model.embed_tokens.weight"]
    emb = live.llm.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([emb]):
        ids = [live.config.image_start_id, live.config.image_end_id]
        equal["image_rows"] = bool(torch.equal(emb[ids], exported[ids]))
        equal["other_rows_from_the_llm"] = not bool(torch.equal(emb[:10], exported[:10]))
    facts["init_from_equal"] = equal
    facts["elements_gathered_by_each_build"] = builds  # the trainer's, the probe's, init_from's
    facts["llm_elements"] = sum(p.ds_numel for p in live.llm.parameters())
    (Path(out_dir) / f"facts-rank{torch.distributed.get_rank()}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:5])
