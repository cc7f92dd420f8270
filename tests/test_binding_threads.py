"""lrq._native from several Python threads (the binding releases the GIL around llama.cpp work).

References are the same calls made sequentially on one thread: one Model is one llama_context,
so with the Model's mutex every concurrent call must give bit-identical results; llama.cpp's
log is captured per Model, so an exception carries only the lines of its own model's call.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import gguf_edit
import numpy as np
import pytest
from gguf import GGUFValueType as T

from lrq import _native  # built by `make build`; a missing build must fail, not skip

N_CTX = 64
# one llama.cpp thread per Model: the test machine's cores are shared, and the race being
# tested is between Python threads, not inside llama.cpp's pool
LLAMA_THREADS = 1
# calls per Python thread: each concurrent call is a chance for a missing lock to show; without
# the Model's mutex the one-Model test failed on every run at this count
ROUNDS = 12
PPL_WINDOW = 16
# vocabulary of the slowly refused file (bad_files): tens of ms of vocabulary loading in
# llama.cpp, long enough for the other thread to finish several calls meanwhile
VOCAB_SLOW = 20_000
SLOW_LOADS = 3


def run_concurrently(*fns):
    """Run each fn on its own thread, all released together; return their results in order
    (an exception raised by a fn is returned as its result)."""
    barrier = threading.Barrier(len(fns))
    results: list = [None] * len(fns)

    def worker(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test, which fails on it
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def token_runs(n_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two token sequences of different lengths (a mixed-up result cannot even have the right
    shape) and a longer one for perplexity."""
    rng = np.random.default_rng(11)
    return (rng.integers(0, n_vocab, 48, dtype=np.int32),
            rng.integers(0, n_vocab, 29, dtype=np.int32),
            rng.integers(0, n_vocab, 4 * PPL_WINDOW, dtype=np.int32))


def load_error(path) -> str:
    with pytest.raises(_native.LoadError) as e:
        _native.Model(str(path), n_ctx=N_CTX, n_threads=LLAMA_THREADS)
    return str(e.value)


def log_lines(message: str) -> set[str]:
    """llama.cpp's lines in a LoadError message (each on its own line, indented)."""
    return {line.strip() for line in message.splitlines()[1:]}


@pytest.fixture
def bad_files(tmp_path, tiny_gguf):
    """Two files llama.cpp refuses with different lines: (slow, fast).

    slow: the tiny model with its vocabulary grown to VOCAB_SLOW tokens, refused after the
    vocabulary is loaded (token_embd has the old shape); loading that vocabulary keeps
    llama.cpp busy for tens of ms, with the GIL released.  fast: the tiny model cut in half,
    refused at once (tensor data beyond the end of the file)."""
    r, _ = gguf_edit.read(tiny_gguf)
    old = {k: list(r.fields[f"tokenizer.ggml.{k}"].contents())
           for k in ("tokens", "scores", "token_type")}
    extra = VOCAB_SLOW - len(old["tokens"])
    kv = {
        "tokenizer.ggml.tokens": (old["tokens"] + [f"<extra{i}>" for i in range(extra)],
                                  T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": (old["scores"] + [0.0] * extra, T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (old["token_type"] + [1] * extra, T.ARRAY, T.INT32),   # normal
    }
    slow = gguf_edit.rewrite(tiny_gguf, tmp_path / "vocab_mismatch_a.gguf", kv=kv)
    fast = tmp_path / "truncated_b.gguf"
    data = tiny_gguf.read_bytes()
    fast.write_bytes(data[: len(data) // 2])
    return slow, fast


# The two eval tests run their threads in a child interpreter: the implementation they catch
# (no lock around the llama_context) aborts the process or hangs in llama.cpp rather than
# returning wrong numbers, which must fail one test, not kill or stall the whole session.
# A normal run takes about a second.
CHILD_TIMEOUT_S = 60


def in_child(scenario: str, tmp_path, *args: str) -> dict[str, np.ndarray]:
    """Run ``scenario``(*args) of this module in a fresh interpreter; return its arrays."""
    out = tmp_path / f"{scenario}.npz"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_binding_threads as t; "
            "t.child_main(sys.argv[2:])")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), scenario,
                               str(out), *args],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: still running after {CHILD_TIMEOUT_S} s (deadlock?)")
    assert proc.returncode == 0, f"{scenario}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    with np.load(out) as z:
        return dict(z)


def child_main(argv: list[str]) -> None:
    scenario, out, *args = argv
    np.savez(out, **SCENARIOS[scenario](*args))


def one_model_two_threads(gguf: str) -> dict[str, np.ndarray]:
    """Sequential calls, then the same calls from two threads at once, on one Model."""
    m = _native.Model(gguf, n_ctx=N_CTX, n_threads=LLAMA_THREADS)
    a, b, text = token_runs(m.n_vocab)
    ref = {"a": m.eval(a), "b": m.eval(b),
           "ppl": np.float64(m.perplexity(text, n_ctx=PPL_WINDOW).ppl)}

    def thread_a():
        return [m.eval(a) for _ in range(ROUNDS)]

    def thread_b():
        out = []
        for _ in range(ROUNDS):
            out.append(m.eval(b))
            out.append(np.float64(m.perplexity(text, n_ctx=PPL_WINDOW).ppl))
        return out

    got_a, got_b = run_concurrently(thread_a, thread_b)
    return {**{f"ref_{k}": v for k, v in ref.items()}, "got_a": np.stack(got_a),
            "got_b": np.stack(got_b[::2]), "got_ppl": np.array(got_b[1::2])}


def two_models_two_threads(gguf: str) -> dict[str, np.ndarray]:
    """Sequential calls on two Models of one file, then the same calls from two threads."""
    m1 = _native.Model(gguf, n_ctx=N_CTX, n_threads=LLAMA_THREADS)
    m2 = _native.Model(gguf, n_ctx=N_CTX, n_threads=LLAMA_THREADS)
    a, b, _ = token_runs(m1.n_vocab)
    ref_a, ref_b = m1.eval(a), m2.eval(b)
    got_a, got_b = run_concurrently(lambda: [m1.eval(a) for _ in range(ROUNDS)],
                                    lambda: [m2.eval(b) for _ in range(ROUNDS)])
    return {"ref_a": ref_a, "ref_b": ref_b, "got_a": np.stack(got_a), "got_b": np.stack(got_b)}


SCENARIOS = {f.__name__: f for f in (one_model_two_threads, two_models_two_threads)}


def test_two_threads_on_one_model_match_sequential(tiny_gguf, tmp_path):
    """Bit-identical to the sequential calls on the same Model (same context, same kernels).

    Catches a Model without its mutex: the threads' llama_memory_clear / llama_decode /
    llama_get_logits_ith interleave on one llama_context (one thread reads logits of the other's
    batch, or decodes into a cache the other just filled); in practice the child aborts inside
    llama.cpp or hangs."""
    r = in_child("one_model_two_threads", tmp_path, str(tiny_gguf))
    _assert_every_round_equals_sequential(r)
    np.testing.assert_array_equal(r["got_ppl"], np.full(ROUNDS, r["ref_ppl"]))


def _assert_every_round_equals_sequential(r) -> None:
    """Each thread's ROUNDS results bit-identical to its sequential reference."""
    for k in ("a", "b"):
        assert r[f"got_{k}"].shape == (ROUNDS, *r[f"ref_{k}"].shape)
        for x in r[f"got_{k}"]:
            np.testing.assert_array_equal(x, r[f"ref_{k}"])


def test_two_models_in_two_threads_match_sequential(tiny_gguf, tmp_path):
    """Each Model owns its context and buffers: catches anything mutable shared between Models
    (one process-wide lock would pass, but a static batch/logits buffer or one context for all
    Models hands one thread the other's logits, of another shape here)."""
    r = in_child("two_models_two_threads", tmp_path, str(tiny_gguf))
    _assert_every_round_equals_sequential(r)


def test_load_errors_land_on_their_own_model(tiny_gguf, bad_files):
    """Thread A loads a file llama.cpp refuses slowly while thread B, for as long as A runs, loads
    one it refuses at once and loads and evaluates a good one.  Every message must be exactly
    the one the same load gives alone, and B's evaluation the sequential logits.

    Catches a process-global log buffer (the binding before per-model capture): B's calls clear
    the buffer and log into it while A's load is in flight, so A's message loses its own early
    warning ("SPM vocabulary, but newline token not found", logged mid-load) and may carry B's
    lines ("tensor ... not within the file bounds").  With that buffer put back, each of 9 runs
    failed here."""
    bad_a, bad_b = bad_files
    msg_a, msg_b = load_error(bad_a), load_error(bad_b)
    only_b = log_lines(msg_b) - log_lines(msg_a)
    # the check below can only fail if B logs lines A does not
    assert only_b, (msg_a, msg_b)
    good = _native.Model(str(tiny_gguf), n_ctx=N_CTX, n_threads=LLAMA_THREADS)
    tokens = token_runs(good.n_vocab)[0]
    ref_logits = good.eval(tokens)
    del good
    a_done = threading.Event()

    def thread_a():
        try:
            return [load_error(bad_a) for _ in range(SLOW_LOADS)]
        finally:
            a_done.set()

    def thread_b():
        out = []
        while True:   # at least once, then for as long as A is loading
            m = _native.Model(str(tiny_gguf), n_ctx=N_CTX, n_threads=LLAMA_THREADS)
            out.append(m.eval(tokens))
            out.append(load_error(bad_b))
            if a_done.is_set():
                return out

    got_a, got_b = run_concurrently(thread_a, thread_b)
    for msg in got_a:
        assert "vocab_mismatch_a.gguf" in msg and "truncated_b.gguf" not in msg
        assert not log_lines(msg) & only_b, msg
        assert msg == msg_a
    for logits, msg in zip(got_b[::2], got_b[1::2]):
        assert msg == msg_b
        np.testing.assert_array_equal(logits, ref_logits)


def test_load_error_carries_no_lines_of_an_earlier_failure(bad_files):
    """A failing load right after a different failing load on the same thread: catches a log
    buffer that is per thread (or per process) but never emptied between calls, which would
    append the earlier file's lines to the later file's message."""
    bad_a, bad_b = bad_files
    first_a = load_error(bad_a)
    msg_b = load_error(bad_b)
    after_b = load_error(bad_a)
    assert after_b == first_a, (first_a, after_b)
    assert "truncated_b.gguf" not in after_b and "vocab_mismatch_a.gguf" in after_b
    assert not log_lines(after_b) & (log_lines(msg_b) - log_lines(first_a))
