"""Offline rotation of the residual stream (QuaRot-style), before quantization.

    rotate_model("model.gguf", "rotated-f32.gguf", seed=0)     # any dequantizable source -> F32

The model computes the same function (up to float32 storage of the result) but its weights have
no outlier channels left to hurt a low-bit quantizer.  Steps, for a llama / qwen2 / qwen3 GGUF
(numpy shapes, W [n_out, n_in], activations are row vectors, y = x W^T):

1. **Fold every RMSNorm weight into the linears that read it.**  RMSNorm with a per-channel
   weight g does not commute with a rotation; without one it does, because an orthogonal Q keeps
   ``mean(x^2)``: ``rmsnorm(x Q) = rmsnorm(x) Q``.  So ``W <- W diag(g)`` for attn_q/k/v
   (attn_norm), ffn_gate/up (ffn_norm) and the output head (output_norm); the norms become 1.
2. **Rotate the residual basis** ``x -> x Q``: token embedding ``E <- E Q``; every linear
   reading the residual ``W <- W Q`` (after folding); every linear writing to it
   ``W <- Q^T W`` (attn_output, ffn_down, and their biases ``b <- Q^T b`` if present); the
   output head ``H <- H diag(g_out) Q``.  Attention, RoPE, Qwen3's per-head q/k norms and the
   q/k/v biases live on the other side of the projections and are untouched.
3. **Tied embeddings are untied**: the head becomes ``E diag(g_out) Q``, which differs from the
   rotated embedding ``E Q`` unless g_out = 1, so a separate ``output.weight`` is written (a
   vocab x d F32 tensor more; the rotate log says so).

**The orthogonal matrix.**  ``Q = diag(s) (H_p / sqrt(p)) kron R_m`` with ``d = p m``, p the
largest power of two dividing d, H_p the Sylvester Hadamard matrix, s random signs (the
"randomized Hadamard" of QuaRot) and R_m a Haar-random orthogonal m x m matrix (QR of a Gaussian
matrix with the signs of R's diagonal fixed).  A Hadamard matrix of order m exists only for
m in {1, 2} or m a multiple of 4, so the odd part (SmolLM2: 576 = 64 * 9; Qwen2.5-1.5B:
1536 = 512 * 3) cannot be Hadamard; a random orthogonal block is the simplest exact choice.
Every entry of Q is then at most ``max|R_m| / sqrt(p)`` in magnitude: one channel's outlier is
spread over all d channels.  Everything is computed in float64 from the seed (numpy
``default_rng(seed)``) and the result is stored as F32.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["RotateError", "RotateSummary", "hadamard", "random_orthogonal", "rotation_matrix",
           "rotate_model", "rotated_tensors", "weight_stats", "kurtosis"]

_READERS = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm",
            "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm"}
_WRITERS = ("attn_output", "ffn_down")
# every blk.N.* tensor this module understands; anything else (fused qkv, MoE, post-norms ...)
# would read or write the residual in a way the rotation does not handle: refused by name
_BLOCK_OK = re.compile(r"^blk\.\d+\.(attn_norm|ffn_norm|attn_q_norm|attn_k_norm)\.weight$|"
                       r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.(weight|bias)$")
_GLOBAL_OK = ("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight")
SUPPORTED = ("llama", "qwen2", "qwen3")
ALL_F32 = 0   # llama_ftype LLAMA_FTYPE_ALL_F32


class RotateError(ValueError):
    """The source cannot be rotated; the message names the file and the tensor / key."""


# ---- the orthogonal matrix ------------------------------------------------------------------

def hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order n (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise RotateError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(m: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random orthogonal m x m (QR of a Gaussian matrix, R's diagonal made positive)."""
    if m == 1:
        return np.ones((1, 1))
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    return q * np.sign(np.diag(r))[None, :]


def rotation_matrix(d: int, seed: int = 0) -> np.ndarray:
    """Q = diag(s) (H_p / sqrt(p)) kron R_m, d = p * m, p the power-of-two part (module doc)."""
    if d < 1:
        raise RotateError(f"dimension must be >= 1, got {d}")
    p = d & -d                   # largest power of two dividing d
    m = d // p
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=d)
    core = np.kron(hadamard(p) / np.sqrt(p), random_orthogonal(m, rng))
    return signs[:, None] * core


# ---- weight statistics ----------------------------------------------------------------------

def kurtosis(w: np.ndarray) -> float:
    """E[(w - mean)^4] / var^2 over all entries (3 for a Gaussian; large with outliers)."""
    x = np.asarray(w, dtype=np.float64).ravel()
    x = x - x.mean()
    v = (x * x).mean()
    return float((x ** 4).mean() / (v * v)) if v > 0 else float("nan")


def weight_stats(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Per block linear (or ``names``): kurtosis and max|w| / std (outlier ratio)."""
    from .model_file import open_model
    m = open_model(path)
    if names is None:
        names = [n for n in m.tensor_names if re.match(r"^blk\.\d+\.(attn_[qkv]|attn_output|ffn_\w+)\.weight$", n)]
    out = {}
    for n in names:
        w = m.tensor(n)
        out[n] = {"kurtosis": kurtosis(w), "max_over_std": float(np.abs(w).max() / w.std())}
    return out


# ---- the model ------------------------------------------------------------------------------

@dataclass
class RotateSummary:
    output: Path
    arch: str
    n_embd: int
    factor: tuple[int, int]      # (p, m): d = p * m
    untied: bool
    seed: int

    def lines(self) -> list[str]:
        p, m = self.factor
        return ([f"wrote {self.output} (F32, residual rotated, norms folded)",
                 f"  arch {self.arch}, d = {self.n_embd} = {p} (Hadamard) x {m} "
                 f"({'random orthogonal' if m > 1 else 'no odd part'}), seed {self.seed}"]
                + (["  tied embeddings untied: output.weight written separately"] if self.untied else []))


def _plan(src: Path, log: Callable[[str], None]):
    """Open and check the source; (reader, kv, arch, tensors, d, n_layer, tied)."""
    from .gguf_hparams import GGUFFileError, open_reader, read_kv
    try:
        reader = open_reader(src)
    except GGUFFileError as e:
        raise RotateError(str(e)) from None
    kv = read_kv(reader)
    if "lrq.format_version" in kv:
        raise RotateError(f"{src}: is an LRQ file; rotate the source model before converting it")
    arch = kv.get("general.architecture")
    if arch not in SUPPORTED:
        raise RotateError(f"{src}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)})")
    tensors = {t.name: t for t in reader.tensors}
    for name in tensors:
        if name.startswith("blk.") and not _BLOCK_OK.match(name):
            raise RotateError(f"{src}: tensor {name} is not a llama-like block tensor; rotating it is "
                              f"not implemented")
        if not name.startswith("blk.") and name not in _GLOBAL_OK:
            raise RotateError(f"{src}: tensor {name} is not handled by the rotation")
    for key in (f"{arch}.embedding_length", f"{arch}.block_count"):
        if key not in kv:
            raise RotateError(f"{src}: key {key} is missing")
    d, n_layer = int(kv[f"{arch}.embedding_length"]), int(kv[f"{arch}.block_count"])
    for name in ["token_embd.weight", "output_norm.weight"] + [
            f"blk.{i}.{t}.weight" for i in range(n_layer)
            for t in ("attn_norm", "ffn_norm", *_READERS, *_WRITERS)]:
        if name not in tensors:
            raise RotateError(f"{src}: tensor {name} is missing")
    if d // (d & -d) > 64:
        log(f"note: d = {d} has a large odd factor {d // (d & -d)}: Q is mostly a random orthogonal matrix")
    return reader, kv, arch, tensors, d, n_layer, "output.weight" not in tensors


def rotated_tensors(src: str | os.PathLike, seed: int = 0, rotate: bool = True,
                    log: Callable[[str], None] = lambda s: None):
    """(name, float64 array) of every output tensor, in file order (a tied model gets an extra
    ``output.weight`` at the end): the rotation in float64, before any storage rounding."""
    from .gguf_hparams import dequantize_tensor, numpy_shape
    src = Path(src)
    reader, kv, arch, tensors, d, n_layer, tied = _plan(src, log)
    q = rotation_matrix(d, seed) if rotate else None
    f64 = lambda n: dequantize_tensor(tensors[n])          # noqa: E731
    norm_of = {f"blk.{i}.{lin}.weight": f"blk.{i}.{nrm}.weight"
               for i in range(n_layer) for lin, nrm in _READERS.items()}

    def produce(name: str) -> np.ndarray:
        if name == "token_embd.weight":
            return f64(name) if q is None else f64(name) @ q
        if name == "output.weight":
            head = f64("token_embd.weight" if tied else "output.weight")
            head = head * f64("output_norm.weight")[None, :]
            return head if q is None else head @ q
        if name in norm_of:
            w = f64(name) * f64(norm_of[name])[None, :]
            return w if q is None else w @ q
        if re.match(r"^blk\.\d+\.(attn_output|ffn_down)\.(weight|bias)$", name):
            return f64(name) if q is None else q.T @ f64(name)
        if re.match(r"^(blk\.\d+\.(attn_norm|ffn_norm)|output_norm)\.weight$", name):
            return np.ones(numpy_shape(tensors[name]))
        return f64(name)

    for n in list(tensors) + (["output.weight"] if tied else []):
        a = produce(n)
        if not np.isfinite(a).all():
            raise RotateError(f"{src}: tensor {n} has non-finite values after rotation")
        yield n, a


def rotate_model(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
                 rotate: bool = True, log: Callable[[str], None] = lambda s: None,
                 progress: bool = False) -> RotateSummary:
    """Fold the norms and rotate the residual of ``src`` (a plain GGUF of any type gguf-py
    dequantizes) into the F32 GGUF ``out`` (atomic).  ``rotate=False`` only folds the norms
    (the same function, the same outliers: the comparison baseline)."""
    import gguf

    from .gguf_hparams import numpy_shape
    from .gguf_write import GGUFStreamWriter, WriterError

    src, out = Path(src), Path(out)
    reader, kv, arch, tensors, d, n_layer, tied = _plan(src, lambda s: None)
    if out.exists() and out.resolve() == src.resolve():
        raise RotateError(f"{out}: the output would overwrite the source")
    names = list(tensors) + (["output.weight"] if tied else [])
    shapes = {n: numpy_shape(tensors[n]) for n in tensors}
    if tied:
        shapes["output.weight"] = shapes["token_embd.weight"]
    f32 = int(gguf.GGMLQuantizationType.F32)
    try:
        writer = GGUFStreamWriter(out, arch)
    except WriterError as e:
        raise RotateError(str(e)) from None
    with writer:
        for k, f in reader.fields.items():
            if k.startswith("GGUF.") or k in ("general.architecture", "general.file_type"):
                continue
            writer.copy_field(f)
        writer.add_uint32("general.file_type", ALL_F32)
        for n in names:
            writer.add_tensor_info(n, shapes[n], f32)
        writer.write_header()
        it = rotated_tensors(src, seed, rotate, log)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=len(names), desc="lrq rotate", unit="tensor", leave=False, file=sys.stderr)
        for n, a in it:
            writer.write_tensor(n, np.ascontiguousarray(a, dtype=np.float32))
        writer.finish()
    if tied:
        log("tied embeddings: wrote a separate output.weight (the head absorbs output_norm)")
    p = d & -d
    return RotateSummary(out, arch, d, (p, d // p), tied, seed)
