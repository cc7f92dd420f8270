"""llama-perplexity's method (tools/perplexity/perplexity.cpp, ``perplexity()``), for any
logits function, so every executor's figure compares with the C++ tool's.

- ``n_chunk = len(tokens) // n_ctx`` windows (at most ``n_chunks`` when n_chunks >= 0); the
  tool refuses fewer than ``2 * n_ctx`` tokens, and so does this function;
- window i is ``tokens[i*n_ctx : (i+1)*n_ctx]`` evaluated from an empty cache; when the vocab
  adds BOS, its first token is replaced by BOS (only as input: targets are the text's tokens);
- the logits at positions ``first = n_ctx//2 .. n_ctx-2`` score the next token:
  ``nll += logsumexp(l) - l[target]``; ``count += n_ctx - first - 1``;
- ``ppl = exp(nll / count)``; the error is ``ppl * sqrt((E[nll^2] - E[nll]^2) / (count - 1))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_err: float
    n_chunks: int
    count: int                   # scored tokens
    nll: float                   # mean negative log-likelihood (nats)
    chunk_ppl: tuple[float, ...] # running estimate after each chunk (the tool's [i]x.xxxx list)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    l = np.asarray(logits, dtype=np.float64)
    m = l.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(l - m).sum(axis=-1))
    return lse - l[np.arange(l.shape[0]), targets]


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], tokens, n_ctx: int = 512,
               n_chunks: int = -1, bos_id: int | None = None, add_bos: bool = True,
               logits_from: int = 0) -> PerplexityResult:
    """Perplexity of ``tokens`` with llama-perplexity's windows.

    ``logits_fn(window)`` gets the n_ctx token ids of a window (positions 0..n_ctx-1 of an
    empty cache) and returns the logits of positions ``logits_from..n_ctx-1``
    (``logits_from`` <= n_ctx//2 lets an executor skip the unscored first half).
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if n_ctx < 4 or n_ctx % 2:
        raise ValueError(f"n_ctx must be an even number >= 4, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"perplexity needs at least {2 * n_ctx} tokens for a context of {n_ctx} "
                         f"(llama-perplexity's rule); got {len(tokens)}")
    if add_bos and bos_id is None:
        raise ValueError("add_bos is set but the vocab has no BOS id")
    first = n_ctx // 2
    if not 0 <= logits_from <= first:
        raise ValueError(f"logits_from must lie in 0..{first}, got {logits_from}")
    n_max = len(tokens) // n_ctx
    n_chunk = n_max if n_chunks < 0 else min(n_chunks, n_max)
    if n_chunk == 0:
        raise ValueError("n_chunks = 0: nothing to evaluate")
    nll = nll2 = 0.0
    count = 0
    running = []
    for i in range(n_chunk):
        window = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if add_bos:
            window[0] = bos_id
        logits = np.asarray(logits_fn(window))
        if logits.shape[0] != n_ctx - logits_from:
            raise ValueError(f"logits_fn returned {logits.shape[0]} rows, expected {n_ctx - logits_from}")
        scored = logits[first - logits_from:n_ctx - 1 - logits_from]     # positions first..n_ctx-2
        targets = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]            # the text, not the BOS
        v = token_nll(scored, targets)
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += n_ctx - first - 1
        running.append(math.exp(nll / count))
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 else float("nan")
    return PerplexityResult(ppl, err, n_chunk, count, mean, tuple(running))
