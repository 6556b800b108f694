"""Bench: visual-token generation with the KV cache against recomputing the sequence per token.

The baseline is what MetaMorph's reference code does: for each of the m visual tokens, run
the whole sequence (prompt + tokens so far) again. Ours feeds one position per step against
transformers' DynamicCache. Both produce the same tokens (checked here to 1e-5); the cache
turns O(n^2) work into O(n).

    python bench/generate.py [--prompt 256] [--tokens 64] [--hidden 256] [--layers 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (default: 256)")
    ap.add_argument("--tokens", type=int, default=64, help="visual tokens to generate, m (default: 64)")
    ap.add_argument("--hidden", type=int, default=256, help="LLM width (default: 256)")
    ap.add_argument("--layers", type=int, default=4, help="LLM layers (default: 4)")
    ap.add_argument("--vision-dim", type=int, default=1152, help="visual token width (default: 1152, SigLIP)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs each, best kept (default: 3)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from vpit.model.build import ModelConfig, build_model
    from vpit.model.generate import generate

    torch.manual_seed(0)
    cfg = ModelConfig(
        tokenizer="qwen2.5",
        chat_template="chatml",
        vision_dim=args.vision_dim,
        num_visual_tokens=args.tokens,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden,
    )
    model, _ = build_model(cfg)
    model.eval()
    ids = torch.randint(0, 150000, (1, args.prompt))
    vis = torch.zeros(0, args.vision_dim)
    n_new = args.tokens + 1  # <image_start> + m visual tokens

    def best(use_cache: bool):
        times, gen = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            gen = generate(model, ids, vis, max_new_tokens=n_new, force_image=True, use_cache=use_cache)
            times.append(time.perf_counter() - t0)
        return min(times), gen

    generate(model, ids, vis, max_new_tokens=4, force_image=True)  # warm-up
    t_cache, a = best(True)
    t_full, b = best(False)
    err = float(np.abs(a.images[0] - b.images[0]).max())
    print(
        f"model: hidden {args.hidden}, {args.layers} layers; prompt {args.prompt} tokens; "
        f"{args.tokens} visual tokens of {args.vision_dim}; torch threads {torch.get_num_threads()}"
    )
    print(f"recompute every token (MetaMorph baseline): {t_full:.3f}s  ({args.tokens / t_full:.0f} visual tokens/s)")
    print(f"KV cache (ours):                            {t_cache:.3f}s  ({args.tokens / t_cache:.0f} visual tokens/s)")
    print(f"speed-up: {t_full / t_cache:.1f}x   max |difference| of the tokens: {err:.1e} (must be < 1e-5)")
    if err >= 1e-5:
        raise SystemExit("cached and recomputed tokens differ")


if __name__ == "__main__":
    main()
