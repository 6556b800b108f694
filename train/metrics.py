"""Evaluation metrics: pure functions of arrays and strings, checked against hand-computed values.

Understanding: exact match after VQA-style normalisation, multiple-choice accuracy.
Generation, in the SigLIP token space (no pixels needed): mean cosine of generated to target
tokens, retrieval accuracy of the target among candidates, and a Fréchet distance between
pooled generated and real embeddings computed like FID.
"""

from __future__ import annotations

import re
import string

import numpy as np

__all__ = [
    "exact_match",
    "frechet_distance",
    "frechet_distance_gaussians",
    "mean_token_cosine",
    "multiple_choice_correct",
    "normalize_answer",
    "retrieval_accuracy",
]

_NUMBER_WORDS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(text: str) -> str:
    """VQA-style: lowercase, drop punctuation and articles, number words to digits, one space."""
    text = _PUNCT.sub(" ", text.lower())
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


_LETTER = re.compile(r"^\(?([A-Za-z])(?:[).:]|\s|$)")


def multiple_choice_correct(prediction: str, choices: list[str], answer_index: int) -> bool:
    """A prediction picks a choice by its letter ("B", "(b)", "B. blue") or by the choice's text."""
    text = prediction.strip()
    m = _LETTER.match(text)
    if m:
        i = ord(m.group(1).lower()) - ord("a")
        if 0 <= i < len(choices) and normalize_answer(text[m.end() :]) in ("", normalize_answer(choices[i])):
            return i == answer_index
    matches = [i for i, c in enumerate(choices) if normalize_answer(c) == normalize_answer(text)]
    return len(matches) == 1 and matches[0] == answer_index


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_token_cosine(generated: np.ndarray, target: np.ndarray) -> float:
    """Mean over samples and tokens of cos(generated, target); arrays (n, m, d)."""
    return float(np.mean(np.sum(_unit(generated.astype(np.float64)) * _unit(target.astype(np.float64)), axis=-1)))


def retrieval_accuracy(
    generated: np.ndarray, targets: np.ndarray, n_candidates: int | None = None, seed: int = 0
) -> float:
    """Share of samples whose own target is the most similar among `n_candidates` targets.

    Similarity of two token sets is their mean token-aligned cosine. Candidates are the
    sample's own target plus n_candidates-1 others drawn with `seed` (all targets if None).
    Ties count as misses: a candidate identical to the target is not retrieved by luck.
    """
    n = len(generated)
    g = _unit(generated.astype(np.float64)).reshape(n, -1)
    t = _unit(targets.astype(np.float64)).reshape(n, -1)
    sim = g @ t.T / generated.shape[1]  # (n, n): mean token cosine of generated i vs target j
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n):
        others = np.delete(np.arange(n), i)
        if n_candidates is not None:
            others = rng.choice(others, size=min(n_candidates - 1, len(others)), replace=False)
        hits += bool(np.all(sim[i, i] > sim[i, others]))
    return hits / n


def frechet_distance_gaussians(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1-mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    Tr((C1 C2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix C1^(1/2) C2 C1^(1/2), which has the same spectrum as C1 C2; that is
    exact and stable with numpy alone (no scipy.linalg.sqrtm and its complex round-off).
    """
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ cov2 @ root1
    trace_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def frechet_distance(generated: np.ndarray, real: np.ndarray) -> float:
    """FID computed in the token space: each sample pooled to one vector (mean over tokens)."""
    a = generated.astype(np.float64).reshape(len(generated), -1, generated.shape[-1]).mean(axis=1)
    b = real.astype(np.float64).reshape(len(real), -1, real.shape[-1]).mean(axis=1)
    return frechet_distance_gaussians(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
