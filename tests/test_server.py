"""llama-server with several slots on an LRQ file with a replicated layer (bench/server_load.py's
harness, short): concurrent greedy answers equal the same requests sent alone, text and
probabilities bit for bit; the solo answers equal the binding's greedy decoding of the same
tokens; bad requests get an error answer while the server keeps serving.  The full load
(SmolLM2, 200 requests from 16 clients, speed figures) is bench/server_load.py; docs/RESULTS.md
"Server under load".
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from lrq import _native, tools  # built by `make build`; a missing build must fail, not skip
from lrq.convert import ConvertOptions, convert

REPO = Path(__file__).resolve().parents[1]

THREADS = 2
SLOTS = 2
CLIENTS = 4
REQUESTS = 20
N_PROMPTS = 5
MAX_TOKENS = 8
CTX = 256                # per slot
REQUEST_TIMEOUT = 60.0   # seconds; a tiny model answers in milliseconds
LOAD_TIME_LIMIT = 60.0
SEED = 7
N_PROBS = 3              # top-n probabilities of every generated token, compared bit for bit


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_server_load", REPO / "bench" / "server_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod         # dataclasses look their module up while executing it
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def replicated(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny llama model at 3 bits with its last layer run twice; the replica starts on a
    shifted, stretched grid so that it really differs from the first execution.

    Converted from a Q4_1 quantization of the tiny model, so that the tensors the converter keeps
    are quantized as in a real model (token_embd, the tied output: Q8_0, llama-quantize's
    fallback for 64 columns) instead of F32: ggml's F32 matmul is not bit-for-bit independent of
    the batch size (measured: under this load, the same LRQ conversion made from the F32 model,
    and the F32 model itself, give the same texts but other probabilities in 20 of 20 answers),
    which would hide what this file checks, that the LRQ op is."""
    d = tmp_path_factory.mktemp("server")
    q41 = d / "tiny-llama-q4_1.gguf"
    tools.run("llama-quantize", [tiny_gguf, q41, "Q4_1"], timeout=120)
    out = d / "tiny-llama-b3-last1.gguf"
    convert(q41, out, ConvertOptions(bits=3, group_size=32, plan="last-1", grid_offset=0.5,
                                     scale_delta=0.1, progress=False))
    return out


@pytest.fixture(scope="module")
def server(bench, replicated, tmp_path_factory):
    with bench.Server(replicated, slots=SLOTS, ctx=CTX, threads=THREADS, http_threads=CLIENTS + 2,
                      log_dir=tmp_path_factory.mktemp("server-log")) as srv:
        yield srv


def _prompts(bench):
    return bench.PROMPTS[:N_PROMPTS]


def _req(bench, cache_prompt: bool = True):
    # the tiny SentencePiece vocabulary has no chat template: the /completion route
    return bench.Req("completion", MAX_TOKENS, SEED, REQUEST_TIMEOUT, cache_prompt, N_PROBS)


# cache_prompt on (the server's default): a repeated prompt mostly comes from a slot's KV cache
# and only decoding shares batches; off: every prompt is evaluated again, so the prompt tokens of
# several requests share a batch too.
@pytest.mark.parametrize("cache_prompt", [True, False], ids=["cache", "no-cache"])
def test_concurrent_answers_equal_solo_answers(bench, server, cache_prompt):
    prompts, req = _prompts(bench), _req(bench, cache_prompt)
    solo = bench.solo_answers(server.port, req, prompts)
    assert all(a.ok for a in solo), [a.error for a in solo]
    # the comparison could not catch a mix-up between sequences if every prompt got one answer
    assert len({a.text for a in solo}) >= 3, [a.text for a in solo]
    assert all(a.probs for a in solo)
    order = [i % N_PROMPTS for i in range(REQUESTS)]
    answers, wall = bench.load_answers(server.port, req, prompts, order, CLIENTS, LOAD_TIME_LIMIT)
    assert [a.error for a in answers if not a.ok] == []
    # requests overlapped (4 clients on 2 slots), so sequences shared the server's batches
    assert sum(a.latency for a in answers) > 1.5 * wall
    assert [a.text for a in answers] == [solo[i].text for i in order]
    assert all(a.tokens == MAX_TOKENS for a in answers)
    # bit for bit: an op whose result depends on the batch (its size or the other sequences in
    # it) changes probabilities long before it changes a greedy text (see `replicated`)
    assert [a.probs for a in answers] == [solo[i].probs for i in order]


def _post_tokens(bench, port: int, tokens: list[int]) -> list[int]:
    body = json.dumps({"prompt": tokens, "n_predict": MAX_TOKENS, "temperature": 0, "seed": SEED,
                       "return_tokens": True}).encode()
    status, raw = bench.request(port, "POST", "/completion", body, REQUEST_TIMEOUT)
    assert status == 200, raw[:500]
    return json.loads(raw)["tokens"]


def test_solo_answer_equals_binding_greedy_decoding(bench, server, replicated):
    # independent of the server's slots, batching and sampler: the binding evaluates the whole
    # sequence from an empty cache at every step and takes the arg-max
    model = _native.Model(str(replicated), n_ctx=CTX, n_threads=THREADS)
    for prompt in _prompts(bench)[:2]:
        toks = [int(t) for t in model.tokenize(prompt)]
        seq = list(toks)
        for _ in range(MAX_TOKENS):
            seq.append(int(model.eval(np.array(seq, np.int32))[-1].argmax()))
        assert _post_tokens(bench, server.port, toks) == seq[len(toks):], prompt


def _raw_exchange(bench, port: int, data: bytes) -> bytes:
    """Send bytes as they are and read until the server closes (bounded by the timeout)."""
    with socket.create_connection((bench.HOST, port), timeout=REQUEST_TIMEOUT) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_server_survives_bad_requests(bench, server):
    prompts, req = _prompts(bench), _req(bench)
    want = bench.solo_answers(server.port, req, prompts[:1])[0]
    assert want.ok, want.error
    bad = [
        b'{"prompt": "Hello", "n_predict": ',                    # malformed JSON
        json.dumps({"prompt": "Hello", "n_predict": "many"}).encode(),   # wrong type
        json.dumps({"n_predict": 4}).encode(),                    # no prompt
        b"\xff\xfe not json at all",
    ]
    for body in bad:
        status, raw = bench.request(server.port, "POST", "/completion", body, REQUEST_TIMEOUT)
        # an error answer that says what is wrong (the pinned server answers 500 for JSON it
        # cannot parse and 400 for a wrong or missing field)
        assert 400 <= status < 600, (body, status, raw[:300])
        assert json.loads(raw)["error"]["message"], raw[:300]
        assert server.alive(), server.log_tail()
    # a request cut off in its body, and a connection closed without a request
    _raw_exchange(bench, server.port, b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{\"prompt\": \"Hel")
    _raw_exchange(bench, server.port, b"")
    assert server.alive(), server.log_tail()
    again = bench.solo_answers(server.port, req, prompts[:1])[0]
    assert again.ok and (again.text, again.probs) == (want.text, want.probs)


def test_bench_refuses_a_missing_model_by_name(bench, tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    assert bench.main(["--models", str(missing), "--requests", "1"]) == 2
    assert str(missing) in capsys.readouterr().err
