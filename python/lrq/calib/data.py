"""Calibration token windows: a text (bundled asset or a user's file) tokenized by the source.

Windows are taken at evenly spaced places of the text (each starting at a line start) so a few
thousand tokens cover more than the text's first pages.  Like llama-perplexity, a vocab that adds
BOS gets its first token replaced by BOS, so calibration sees what evaluation sees.

    >>> w = calibration_windows("model.gguf", "sotu-calib", n_tokens=4096, window=512)  # doctest: +SKIP
    >>> w.shape                                                                        # doctest: +SKIP
    (8, 512)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# characters of text per wanted token when cutting a slice to tokenize: English BPE / SPM text
# runs at ~4-5 characters a token; 8 leaves room, a short slice is simply extended
_CHARS_PER_TOKEN = 8


class CalibError(ValueError):
    """Bad calibration input: missing file, unknown text, too little text, mismatched models."""


def load_text(text: str | os.PathLike) -> str:
    """A bundled text asset by name (``sotu-calib``) or a user's text file."""
    from ..assets import AssetError, text as asset_text
    try:
        s = asset_text(text)
    except AssetError as e:
        raise CalibError(f"--text {text}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CalibError(f"--text {text}: cannot read it ({e})") from None
    if not s.strip():
        raise CalibError(f"--text {text}: the text is empty")
    return s


def check_source(source: str | os.PathLike) -> Path:
    """The source must be an existing plain GGUF (the full-precision reference)."""
    p = Path(source)
    if not p.is_file():
        raise CalibError(f"{p}: source model not found")
    from ..lrq_file import read_format_version
    try:
        v = read_format_version(p)
    except Exception as e:   # GGUFFileError and gguf-py's own errors on non-GGUF files
        raise CalibError(f"{p}: not a readable GGUF ({e})") from None
    if v is not None:
        raise CalibError(f"{p}: is an LRQ file; the source must be the plain GGUF it was "
                         f"converted from")
    return p


def calibration_windows(source: str | os.PathLike, text: str | os.PathLike = "sotu-calib",
                        n_tokens: int = 4096, window: int = 512) -> np.ndarray:
    """int64 [n_tokens // window, window] token windows of ``text``, tokenized by ``source``."""
    if window < 4:
        raise CalibError(f"calibration window must be >= 4 tokens, got {window}")
    if n_tokens < window:
        raise CalibError(f"--calib-tokens {n_tokens} is less than one window of {window}")
    n_win = n_tokens // window
    src = check_source(source)
    s = load_text(text)
    from .. import _native
    from ..model_file import open_model
    mf = open_model(src)
    tok = _native.Model(str(src), n_ctx=window, n_threads=1)

    def tokenize(piece: str) -> np.ndarray:
        try:
            return np.asarray(tok.tokenize(piece, add_special=False), dtype=np.int64)
        except (IndexError, RuntimeError, ValueError) as e:   # llama.cpp: a char outside the vocab
            raise CalibError(f"{src}: its tokenizer cannot encode the text {text} "
                             f"({type(e).__name__}: {e})") from None
    def too_few(n: int) -> CalibError:
        return CalibError(f"--text {text}: has {n} tokens, fewer than the {n_win} x {window} "
                          f"calibration tokens asked for")

    if len(s) < n_win * window:          # every token covers at least one character
        raise too_few(len(tokenize(s)))
    full = None
    out = np.empty((n_win, window), dtype=np.int64)
    for i in range(n_win):
        start = i * len(s) // n_win
        if start:
            nl = s.find("\n", start)
            start = nl + 1 if 0 <= nl < len(s) - 1 else start
        span = window * _CHARS_PER_TOKEN
        while True:
            ids = tokenize(s[start:start + span])
            if len(ids) > window or start + span >= len(s):
                break
            span *= 2
        if len(ids) < window:
            # the last slices of a short text: take the text's last tokens instead
            full = tokenize(s) if full is None else full
            if len(full) < n_win * window:
                raise too_few(len(full))
            ids = full[len(full) - window:]
        out[i] = ids[:window]
    if mf.add_bos:
        if mf.bos_id is None:
            raise CalibError(f"{src}: the vocab adds BOS but has no BOS id")
        out[:, 0] = mf.bos_id
    return out
