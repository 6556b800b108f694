"""`vpit export` -> a Hugging Face folder that plain transformers loads with the same logits;
`vpit generate` on it writes the visual tokens as .npy."""

from __future__ import annotations

import numpy as np
import torch

from vpit.cli import main
from vpit.model.build import build_model, load_exported
from vpit.train.config import load_train_config
from vpit.train.export import load_checkpoint_model


def test_export_round_trip_gives_the_same_logits(trained_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(trained_run), "-o", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "vpit.json",
        "projector.safetensors",
        "vision_head.safetensors",
        "tokenizer.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)

    ref, _ = load_checkpoint_model(trained_run)  # DeepSpeed's merge of the ZeRO-3 shards, fp32
    llm = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, nothing of ours
    assert llm.dtype == torch.bfloat16  # written in bf16 by default, and loaded as written
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("<|im_start|>user\nGenerate an image of a red circle<|im_end|>\n<image_start>")])
    assert ids[0, -1].item() == ref.config.image_start_id
    with torch.no_grad():
        got, want = llm(ids).logits.float(), ref.llm(ids).logits
        # within bf16's resolution of the logits' scale
        torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0.02)
    loaded, _ = load_exported(out)
    for name in ("projector", "vision_head"):
        for a, b in zip(getattr(loaded, name).state_dict().values(), getattr(ref, name).state_dict().values()):
            assert torch.equal(a, b.to(torch.bfloat16).float())  # exactly the rounded trained weights
    # the trained weights, not the initialisation the run's seed gives (rebuilt the way the trainer builds it)
    run_cfg = load_train_config(trained_run / "config.yaml")
    inits = []
    for _ in range(2):
        torch.manual_seed(run_cfg.seed)
        inits.append(build_model(run_cfg.model)[0])
    for name in ("projector", "vision_head"):
        init_w, again_w = getattr(inits[0], name)[0].weight, getattr(inits[1], name)[0].weight
        assert torch.equal(init_w, again_w)  # the seed fixes the init, so it is the reference to differ from
        assert not torch.allclose(getattr(ref, name)[0].weight, init_w, atol=1e-4), f"{name} is still its init"

    assert (
        main(
            [
                "generate",
                str(out),
                "--prompt",
                "Generate an image of a blue square in the top left on a white background",
                "-o",
                str(tmp_path / "gen"),
                "--max-new-tokens",
                "40",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "[image 0: 16 x 32 tokens" in printed
    arr = np.load(tmp_path / "gen" / "image-0.npy")
    assert arr.shape == (16, 32) and np.allclose(np.linalg.norm(arr, axis=-1), 1, atol=1e-5)


def test_export_refuses_a_folder_without_a_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "x")]) == 2
    assert "neither a checkpoint folder nor a run folder" in capsys.readouterr().err


def test_export_builds_no_full_size_random_init(trained_run, monkeypatch):
    """The skeleton the checkpoint is loaded into lives on the meta device: no rank of memory is
    spent on (or any time on) a random init of the full model before the weights arrive."""
    import torch.nn as nn

    from vpit.train import export

    seen = []
    real_init = nn.Linear.reset_parameters

    def spy(self):
        seen.append(self.weight.device.type)
        return real_init(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    model, _ = export.load_checkpoint_model(trained_run, torch.bfloat16)
    assert seen and set(seen) == {"meta"}, f"Linear layers initialised on {set(seen)}"
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
