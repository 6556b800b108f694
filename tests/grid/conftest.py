"""The trainer fixtures the grid tests share (a tokenizer, a real mixture with a token cache)."""

from tests.train.conftest import bpe_tokenizer, train_mixture  # noqa: F401 - fixtures
