"""Per-layer sensitivity scores of the layer-selection method (lrq-select).

For base layer k (its seven block linears W, its input activations x = the residual stream
entering the block, over calibration tokens):

    Error_k       = sqrt(sum_W ||W - Q(W)||_F^2) / sqrt(sum_W ||W||_F^2)
    Sensitivity_k = std(x) / mean(|x|)                      (over all tokens and channels)
    Massive_k     = #{ |x| > MASSIVE_FACTOR * mean(|x|) } / #x
    Score_k       = Error_k * Sensitivity_k * (1 + MASSIVE_WEIGHT * Massive_k)

Q is lrq.quant's reference quantizer with the chosen bits / group size / mode / scale search
(the quantization lrq-convert would apply).  Error pools the linears by their squared norms, so
a layer's figure is the relative error of the concatenation of its weights.  Statistics are
accumulated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..quant import dequantize, quantize

MASSIVE_FACTOR = 100.0    # |x| > 100 mean|x| is a "massive activation" (Sun et al. 2024 use ~1e3 x median)
MASSIVE_WEIGHT = 10.0     # the method's weight of the massive fraction in the score
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class SelectError(ValueError):
    """Bad input to layer selection; the message names the file, layer or option."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 2
    group_size: int = 64
    mode: str = "asym"
    scale_search: str = "minmax"

    def describe(self) -> str:
        return f"{self.bits}-bit {self.mode} g{self.group_size} {self.scale_search}"


def quantize_dequantize(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Q(W): lrq.quant's quantizer then its dequantizer (float64 [n_out, n_in])."""
    return dequantize(quantize(np.asarray(w, dtype=np.float32), spec.bits, spec.group_size, spec.mode,
                               scale_search=spec.scale_search))


def relative_error(weights: Iterable[np.ndarray], spec: QuantSpec) -> float:
    """sqrt(sum ||W - Q(W)||_F^2) / sqrt(sum ||W||_F^2) over ``weights``."""
    # the quantizer sees float32 (as the converter does); the error is against the source
    return relative_error_pairs((w, quantize_dequantize(w, spec)) for w in weights)


def relative_error_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """sqrt(sum ||W - Wq||_F^2) / sqrt(sum ||W||_F^2) over (W, Wq) pairs, float64."""
    num = den = 0.0
    n = 0
    for w, wq in pairs:
        w64 = np.asarray(w, dtype=np.float64)
        num += float(((w64 - np.asarray(wq, dtype=np.float64)) ** 2).sum())
        den += float((w64 ** 2).sum())
        n += 1
    if n == 0:
        raise SelectError("no weights to measure the quantization error on")
    if den == 0.0:
        return 0.0
    return float(np.sqrt(num / den))


@dataclass
class ActStats:
    """Streaming moments of a layer's input activations (all elements pooled), float64."""
    n: int = 0
    s1: float = 0.0          # sum x
    s2: float = 0.0          # sum x^2
    sa: float = 0.0          # sum |x|
    _abs: list | None = None  # |x| chunks, kept for the massive-fraction count (needs the mean)

    def add(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
        xr = np.asarray(x, dtype=np.float64).ravel()
        self.n += xr.size
        self.s1 += float(xr.sum())
        self.s2 += float((xr * xr).sum())
        self.sa += float(a.sum())
        if self._abs is None:
            self._abs = []
        self._abs.append(a.astype(np.float32))

    @property
    def mean_abs(self) -> float:
        return self.sa / self.n

    @property
    def std(self) -> float:
        m = self.s1 / self.n
        return float(np.sqrt(max(self.s2 / self.n - m * m, 0.0)))

    def sensitivity(self) -> float:
        """std(x) / mean(|x|) (population std)."""
        if self.n == 0:
            raise SelectError("no activations captured")
        return self.std / self.mean_abs if self.mean_abs > 0 else 0.0

    def massive(self, factor: float = MASSIVE_FACTOR) -> float:
        """Fraction of elements with |x| > factor * mean(|x|)."""
        if self.n == 0:
            raise SelectError("no activations captured")
        thr = factor * self.mean_abs
        return sum(int((a > thr).sum()) for a in self._abs) / self.n


def score(error: float, sensitivity: float, massive: float, weight: float = MASSIVE_WEIGHT) -> float:
    """Score_k = Error_k * Sensitivity_k * (1 + weight * Massive_k)."""
    return error * sensitivity * (1.0 + weight * massive)


@dataclass
class LayerScore:
    layer: int
    error: float
    sensitivity: float
    massive: float
    score: float
    kl: float = float("nan")         # measured: mean KL(ref || only this layer quantized), nats
    dnll: float = float("nan")       # measured: NLL increase on the calibration tokens, nats
