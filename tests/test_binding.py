"""lrq._native against stock behaviour: logits sanity, perplexity equal to llama-perplexity's,
and bad GGUFs raising Python exceptions (never aborting the interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lrq import assets, tools

from lrq import _native  # built by `make build`; a missing build must fail, not skip

# llama-perplexity and the binding run the same kernels on the same windows; llama-perplexity
# batches 4 windows per decode and the binding one, which may reorder float sums slightly.
PPL_REL_TOL = 1e-4
N_CTX = 512
N_CHUNKS = 4
THREADS = 2


@pytest.fixture(scope="module")
def smollm2():
    return assets.path("smollm2-135m")


@pytest.fixture(scope="module")
def model(smollm2):
    return _native.Model(str(smollm2), n_ctx=N_CTX, n_threads=THREADS)


def test_version_info_names_build():
    v = _native.version_info()
    assert v["llama_commit"] == tools.build_info()["llama_commit"]
    assert "CPU" in v["backends"]
    # the patched libllama marks itself (patches/0001-lrq-build-marker.patch)
    assert "LRQ : FORMAT_VERSION = " in v["system_info"]


def test_logits_shape_dtype_finite_deterministic(model):
    tokens = model.tokenize("The quick brown fox jumps over the lazy dog. " * 4)
    a = model.eval(tokens)
    b = model.eval(tokens)
    assert a.shape == (len(tokens), model.n_vocab)
    assert a.dtype == np.float32
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # a prefix evaluated alone gives the same logits as inside the longer batch (causality)
    c = model.eval(tokens[:7])
    np.testing.assert_allclose(c, a[:7], rtol=0, atol=1e-3)


def test_tokenize_roundtrip(model):
    text = "Fellow citizens, the state of the Union is strong."
    tokens = model.tokenize(text, add_special=False)
    assert tokens.dtype == np.int32 and len(tokens) > 5
    assert model.detokenize(tokens) == text


def test_vocab_only_tokenizes_as_the_model_and_evaluates_nothing(model, smollm2):
    """The tokenizer load of the calibration tools (no weights, no context): the same tokens as
    the whole model; evaluation refused by name, not a crash on a missing context."""
    text = "Fellow citizens, the state of the Union is strong. \u00e9t\u00e9 \u4e16\u754c"
    vocab = _native.Model(str(smollm2), n_ctx=64, vocab_only=True)
    for special in (False, True):
        assert np.array_equal(vocab.tokenize(text, add_special=special), model.tokenize(text, add_special=special))
    assert vocab.n_vocab == model.n_vocab
    with pytest.raises(ValueError, match=f"{smollm2}: loaded with vocab_only"):
        vocab.eval(np.array([1, 2, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="loaded with vocab_only"):
        vocab.perplexity(np.arange(1, 200, dtype=np.int32), 64)


def test_unencodable_text_is_a_clear_error(tiny_models):
    # the tiny llama's SentencePiece vocabulary has no byte fallback: llama.cpp's tokenizer throws
    # std::out_of_range ("unordered_map::at") on a character it lacks; the binding names the file
    path = tiny_models.gguf("llama")
    m = _native.Model(str(path), n_ctx=64)
    with pytest.raises(ValueError, match=f"{path}: the vocabulary has no token for a character"):
        m.tokenize("\u4e2d\u6587", add_special=False)
    assert len(m.tokenize("a", add_special=False)) == 1      # the model still works afterwards


def test_perplexity_equals_llama_perplexity(model, smollm2):
    text_file = assets.path("sotu-eval")
    ours = model.perplexity(model.tokenize(text_file.read_text()), n_ctx=N_CTX, n_chunks=N_CHUNKS)
    ref = tools.perplexity(smollm2, text_file, ctx=N_CTX, chunks=N_CHUNKS, threads=THREADS)
    assert ours.n_chunks == ref.n_chunks == N_CHUNKS
    assert ours.count == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    assert abs(ours.ppl - ref.ppl) / ref.ppl < PPL_REL_TOL, (ours.ppl, ref.ppl)
    assert "LRQ : FORMAT_VERSION = " in ref.log    # the tool is the patched build


def test_perplexity_needs_two_windows(model):
    with pytest.raises(ValueError, match="at least 1024"):
        model.perplexity(model.tokenize("too short"), n_ctx=N_CTX)


def test_eval_rejects_bad_tokens(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.eval(np.array([1, model.n_vocab], dtype=np.int32))
    with pytest.raises(ValueError, match="1..512"):
        model.eval(np.zeros(N_CTX + 1, dtype=np.int32))


def test_missing_file_names_path(tmp_path):
    p = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        _native.Model(str(p))


def test_truncated_gguf_raises_naming_path(tmp_path, smollm2):
    p = tmp_path / "truncated.gguf"
    with open(smollm2, "rb") as f:
        p.write_bytes(f.read(10_000_000))
    with pytest.raises(_native.LoadError, match="truncated.gguf"):
        _native.Model(str(p))


@pytest.mark.parametrize("content", [b"", b"GGUF", os.urandom(4096), b"GGUF" + os.urandom(4096)],
                         ids=["empty", "magic-only", "random", "magic-then-random"])
def test_garbage_gguf_raises_naming_path(tmp_path, content):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(content)
    with pytest.raises(_native.LoadError, match="garbage.gguf"):
        _native.Model(str(p))


def test_bad_load_does_not_kill_interpreter(tmp_path):
    """A corrupt file in a fresh interpreter: an exception, then the interpreter carries on."""
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    code = (f"import lrq._native as n\ntry:\n    n.Model({str(p)!r})\nexcept n.LoadError as e:\n"
            f"    print('caught', 'bad.gguf' in str(e))\nprint('alive')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["caught", "True", "alive"]
