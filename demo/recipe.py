"""The demo's recipe in one place: the encoder, the model, the learning rate.

Chosen by measurement so that, in a few CPU minutes, the generated images of prompts the
model never saw get their background and most colours at the right places (the judge's
numbers in the report):

- tokens: the tiny SigLIP's 14x14 patch grid pooled to 4x4 = 16 tokens per image (the
  reference recipe pools so400m's 27x27 to 8x8 = 64): a quadrant is 2x2 tokens, and a model
  that must emit 16 tokens per image learns them in a fraction of the steps 64 need;
- the model: width 128, 2 layers (width 64 learnt the backgrounds but no shape), the vision
  loss weighted 3x (colour at position on unseen prompts: 46% at 1x, 63% at 2x, same steps),
  learning rate 1e-3 (2e-3: 41%);
- rows of 256 tokens: a generation sample is about 70, so a batch packs into rows with little
  padding, and a step costs half of what rows of 1024 cost (same accuracy: packed samples
  never attend to each other);
- the tokenizer: a 512-id BPE of the demo's own texts (`train_stage.demo_tokenizer`).

Measured with 2,000 generation and 400 understanding samples, 1,000 steps of 16, judged on 60
unseen prompts by the token judge (`vpit.judge.TokenJudge`).
"""

from __future__ import annotations

from vpit.model.encoder import EncoderConfig

__all__ = ["DEMO_ENCODER", "DEMO_LR", "DEMO_MAX_LEN", "DEMO_MODEL"]

DEMO_ENCODER = EncoderConfig(encoder="tiny", tokens=16)
DEMO_MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256, "vision_coef": 3.0}
DEMO_LR = 1e-3
DEMO_MAX_LEN = 256
