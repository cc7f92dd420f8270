"""Read a GGUF's metadata and tensor directory with gguf-py, with clear errors; model
hyper-parameters from the base-architecture keys.

Shared by lrq.lrq_file and the converter.  (lrq.model_file, owned separately, may reuse these
helpers; they live here because that module did not exist when the LRQ reader was written.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import gguf_types
from .gguf_lean import LeanGGUFReader

GGUF_MAGIC = b"GGUF"
_MIN_SIZE = 24          # magic + version + tensor count + kv count


class GGUFFileError(ValueError):
    """A file is not a readable GGUF; the message names the file (and key / tensor)."""


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """gguf.GGUFReader on ``path`` (LRQ types registered); errors name the file and say why."""
    gguf_types.register()
    p = Path(path)
    if not p.is_file():
        raise GGUFFileError(f"{p}: no such file")
    size = p.stat().st_size
    if size < _MIN_SIZE:
        raise GGUFFileError(f"{p}: {size} bytes is too short to be a GGUF file (truncated?)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFFileError(f"{p}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = LeanGGUFReader(p)
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on short or corrupt data
        raise GGUFFileError(f"{p}: cannot parse the GGUF ({type(e).__name__}: {e}); the file is "
                            f"truncated or corrupt") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFFileError(f"{p}: tensor {t.name} needs bytes up to {end} but the file has "
                                f"{size}; the file is truncated")
    return reader


def read_field(field) -> Any:
    """gguf-py's ReaderField.contents(), except that a string that is not valid UTF-8 is decoded
    with replacement characters instead of raising UnicodeDecodeError: gguf and llama.cpp take
    any bytes as a string (a model's name, a byte-level token), so the Python readers must too."""
    try:
        return field.contents()
    except UnicodeDecodeError:
        def dec(i):
            return bytes(field.parts[i]).decode("utf-8", errors="replace")
        if field.types[0] == gguf.GGUFValueType.STRING:
            return dec(field.data[0])
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
            return [dec(i) for i in field.data]
        raise


def check_tokens_unique(tokens, where: str) -> None:
    """Rule F2 (docs/FORMAT.md section 10): tokenizer.ggml.tokens holds each string once —
    llama.cpp's vocabulary loader aborts on a repeated one, so both readers refuse it first."""
    if not isinstance(tokens, list):
        return
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        j = seen.setdefault(t, i)
        if j != i:
            raise GGUFFileError(f"{where}: tokenizer.ggml.tokens: token {i} repeats token {j} "
                                f"({t[:40]!r}); a vocabulary has each string once")


def read_kv(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key (except gguf-py's GGUF.* pseudo keys) -> its python value."""
    return {k: read_field(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def numpy_shape(t) -> tuple[int, ...]:
    """Element shape of a ReaderTensor in numpy order ([n_out, n_in] for a weight)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _get(kv: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in kv:
        return kv[key]
    if default is ...:
        raise GGUFFileError(f"{where}: required key {key} is missing")
    return default


def _int(kv: dict, key: str, where: str, default: Any = ...) -> int:
    """An integer key: llama.cpp reads these with a type check, so a string "30" or a float is
    refused here too (the two readers must accept the same files)."""
    v = _get(kv, key, where, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise GGUFFileError(f"{where}: key {key} must be an integer, got {type(v).__name__} {v!r:.40}")
    if v < 0:
        raise GGUFFileError(f"{where}: key {key} must be >= 0, got {v}")
    return int(v)


def _float(kv: dict, key: str, where: str, default: Any = ...) -> float:
    v = _get(kv, key, where, default)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise GGUFFileError(f"{where}: key {key} must be a number, got {type(v).__name__} {v!r:.40}")
    return float(v)


def hparams(kv: dict[str, Any], base: str, tensor_shapes: dict[str, tuple[int, ...]],
            where: str) -> dict[str, Any]:
    """Hyper-parameters of a llama-like model from its ``<base>.*`` keys and tensor shapes."""
    n_embd = _int(kv, f"{base}.embedding_length", where)
    n_head = _int(kv, f"{base}.attention.head_count", where)
    if n_head == 0:
        raise GGUFFileError(f"{where}: key {base}.attention.head_count must be > 0")
    n_vocab = kv.get(f"{base}.vocab_size")
    if n_vocab is None:
        if "token_embd.weight" in tensor_shapes:
            n_vocab = tensor_shapes["token_embd.weight"][0]
        else:
            n_vocab = len(_get(kv, "tokenizer.ggml.tokens", where))
    else:
        n_vocab = _int(kv, f"{base}.vocab_size", where)
    head_dim = _int(kv, f"{base}.attention.key_length", where, n_embd // n_head)
    return {
        "arch": base,
        "n_layer": _int(kv, f"{base}.block_count", where),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_head_kv": _int(kv, f"{base}.attention.head_count_kv", where, n_head),
        "n_ff": _int(kv, f"{base}.feed_forward_length", where),
        "n_vocab": int(n_vocab),
        "n_ctx_train": _int(kv, f"{base}.context_length", where, 0),
        "rope_theta": _float(kv, f"{base}.rope.freq_base", where, 10000.0),
        "rope_dim": _int(kv, f"{base}.rope.dimension_count", where, head_dim),
        "rms_eps": _float(kv, f"{base}.attention.layer_norm_rms_epsilon", where),
        "head_dim": head_dim,
        "head_dim_v": _int(kv, f"{base}.attention.value_length", where, head_dim),
        "tied_embeddings": "output.weight" not in tensor_shapes,
        "qk_norm": "blk.0.attn_q_norm.weight" in tensor_shapes,
        "attn_bias": "blk.0.attn_q.bias" in tensor_shapes,
    }


def dequantize_tensor(t) -> np.ndarray:
    """float64 numpy array (numpy element shape) of a stock-typed ReaderTensor."""
    qtype = t.tensor_type
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                 gguf.GGMLQuantizationType.F64):
        return np.asarray(t.data, dtype=np.float64).reshape(numpy_shape(t))
    return gguf.quants.dequantize(t.data, qtype).astype(np.float64).reshape(numpy_shape(t))


def dequantize_rows(t, ids) -> np.ndarray:
    """float64 rows ``ids`` (numpy's first axis) of a stock-typed 2-D ReaderTensor, shape
    ``[*ids.shape, n_cols]``, dequantizing only those rows (the token embeddings of some
    tokens, without the whole matrix: 152k x 5120 x 8 bytes on a 32B model)."""
    uniq, inv = np.unique(np.asarray(ids, dtype=np.int64).ravel(), return_inverse=True)
    data = np.asarray(t.data)[uniq]
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                         gguf.GGMLQuantizationType.F64):
        out = data.astype(np.float64)
    else:
        out = gguf.quants.dequantize(data, t.tensor_type).astype(np.float64)
    return out.reshape(len(uniq), -1)[inv].reshape(*np.shape(ids), -1)
