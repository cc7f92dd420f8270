"""Adapters (--lrq-adapter, docs/FORMAT.md section 11) in the patched llama.cpp and the binding.

- base + adapter gives bit-identical logits to the converted LRQ file it was split from (stock
  IQ2_XS codes with calibrated-style gain / bias / clip / low-rank parameters, and lrq's own codes);
- an identity adapter (gain 1, bias 0, the base's own schedule) gives the base's logits bit for
  bit, and so does a layer map whose extra execution has gain 0 on attn_output and ffn_down;
- every bad adapter or base of tests/test_adapter.py's table (BAD_ADAPTERS) is refused by the C++
  loader too, in the same words, naming the adapter and the base; its good files load;
- llama-server and llama-completion serve base + adapter (the server's greedy tokens equal the
  binding's), and the RPC backend runs base + adapter as the CPU does.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from lrq import _native, tools
from lrq.adapter import split_lrq_file, write_adapter
from lrq.convert import ConvertOptions, convert
from lrq.convert.update import set_replica_params
from lrq.plan import layer_map
from numerics import nmse
from test_adapter import BAD_ADAPTERS, Files as AdapterFiles
from tiny_models import TINY_VOCAB

REPO = Path(__file__).resolve().parents[1]
THREADS = 2
F32 = 0
# The exactness checks compare with array_equal; this bound only proves that the parameters of an
# adapter do something, so that "bit-identical" is not trivially true of an adapter that is
# ignored (the control: base + adapter against the base alone, measured > 0.01 here).
ADAPTER_CHANGES_MODEL_NMSE = 1e-4
SERVER_TOKENS = 6


def _tokens(seed: int, n: int) -> np.ndarray:
    t = np.random.default_rng(seed).integers(3, TINY_VOCAB, size=n).astype(np.int32)
    t[0] = 1
    return t


def _n_outs(path) -> tuple[int, dict[str, int]]:
    """(layer count, {weight name: n_out}) of a plain GGUF, from its tensor table (ggml ne[1])."""
    r = gguf.GGUFReader(str(path))
    n_layer = int(r.fields["llama.block_count"].contents())
    return n_layer, {t.name: int(t.shape[1]) for t in r.tensors if t.name.endswith(".weight") and len(t.shape) == 2}


def _model(path, **kw):
    kw = {k: str(v) for k, v in kw.items()}
    return _native.Model(str(path), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0, **kw)


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    return AdapterFiles(tiny_models, tmp_path_factory.mktemp("adapter-native"))


@pytest.fixture(scope="module")
def iq2(tiny_models, tmp_path_factory):
    """A tiny 256-wide model as llama-quantize's IQ2_XS file, its LRQ wrapping with the last layer
    run twice and random replica parameters, and that file split into a stock base + adapter."""
    from test_stock_base import StockFiles, _random_params
    root = tmp_path_factory.mktemp("adapter-iq2")
    stock = StockFiles(root)
    plain = stock.get("llama", "IQ2_XS", "all")
    lrq = set_replica_params(plain, root / "iq2-all.params.gguf", _random_params(plain))
    base, adapter = root / "iq2.base.gguf", root / "iq2.adapter.gguf"
    split_lrq_file(lrq, adapter, base)
    return {"lrq": lrq, "base": base, "adapter": adapter, "quantized": next(stock.work.glob("*.IQ2_XS.imat.gguf"))}


# ---- exact equalities ----------------------------------------------------------------------------

def test_stock_base_plus_adapter_equals_the_converted_file(iq2):
    toks = _tokens(3, 40)
    got = _model(iq2["base"], adapter=iq2["adapter"]).eval(toks)
    np.testing.assert_array_equal(got, _model(iq2["lrq"]).eval(toks))
    # the split base is llama-quantize's own file tensor for tensor: the adapter binds to that too
    np.testing.assert_array_equal(_model(iq2["quantized"], adapter=iq2["adapter"]).eval(toks), got)
    assert nmse(got, _model(iq2["base"]).eval(toks)) > ADAPTER_CHANGES_MODEL_NMSE
    # the adapter adds its parameters, nothing else: the base's weights are not copied
    assert _model(iq2["base"], adapter=iq2["adapter"]).size_bytes == _model(iq2["lrq"]).size_bytes


@pytest.mark.parametrize("which", ["stock", "own"])
def test_split_files_equal_their_lrq_file(files, tmp_path, which):
    lrq = getattr(files, which)
    base, adapter = tmp_path / "b.gguf", tmp_path / "a.gguf"
    split_lrq_file(lrq, adapter, base)
    toks = _tokens(5, 30)
    got = _model(base, adapter=adapter).eval(toks)
    np.testing.assert_array_equal(got, _model(lrq).eval(toks))
    assert nmse(got, _model(base).eval(toks)) > ADAPTER_CHANGES_MODEL_NMSE


def test_identity_adapter_equals_the_base(iq2, tmp_path):
    base = iq2["quantized"]
    n_layer, n_outs = _n_outs(base)
    tensors = {}
    for layer in range(n_layer):
        for stem in ("attn_q", "attn_output", "ffn_up", "ffn_down"):
            n_out = n_outs[f"blk.{layer}.{stem}.weight"]
            tensors[f"blk.{layer}.{stem}.lrq_r0.gain"] = (np.ones(n_out, np.float32), F32)
            tensors[f"blk.{layer}.{stem}.lrq_r0.bias"] = (np.zeros(n_out, np.float32), F32)
    ident = write_adapter(base, layer_map(f"0..{n_layer - 1}", n_layer), tensors, tmp_path / "ident.gguf")
    toks = _tokens(4, 40)
    np.testing.assert_array_equal(_model(base, adapter=ident).eval(toks), _model(base).eval(toks))


def test_map_with_zero_gain_extra_execution_equals_the_base(iq2, tmp_path):
    base = iq2["quantized"]
    n_layer, n_outs = _n_outs(base)
    last = n_layer - 1
    tensors = {}
    for stem in ("attn_output", "ffn_down"):
        n_out = n_outs[f"blk.{last}.{stem}.weight"]
        tensors[f"blk.{last}.{stem}.lrq_r1.gain"] = (np.zeros(n_out, np.float32), F32)
    # whatever else the extra execution does, its block adds nothing to the residual stream
    n_q = n_outs[f"blk.{last}.attn_q.weight"]
    tensors[f"blk.{last}.attn_q.lrq_r1.gain"] = (np.full(n_q, 3.0, np.float32), F32)
    tensors[f"blk.{last}.ffn_up.lrq_r1.clip"] = (np.array([0.5], np.float32), F32)
    noop = write_adapter(base, layer_map(f"{last}x2", n_layer), tensors, tmp_path / "noop.gguf")
    toks = _tokens(6, 40)
    want = _model(base).eval(toks)
    np.testing.assert_array_equal(_model(base, adapter=noop).eval(toks), want)
    # the control: the same map without the zero gains is another model
    assert nmse(_model(base, layers=f"{last}x2").eval(toks), want) > ADAPTER_CHANGES_MODEL_NMSE


# ---- refusals: the one table ---------------------------------------------------------------------

@pytest.mark.parametrize("name,make,msg", BAD_ADAPTERS, ids=[b[0] for b in BAD_ADAPTERS])
def test_cpp_refuses_every_bad_adapter_in_the_same_words(files, name, make, msg, tmp_path):
    base, adapter = make(files, tmp_path)
    with pytest.raises(_native.LoadError) as ei:
        _native.Model(str(base), n_ctx=16, n_threads=THREADS, adapter=str(adapter))
    text = str(ei.value)
    assert msg in text and str(adapter) in text and str(base) in text, text
    # a tool: a non-zero exit (never a signal), the same words
    proc = subprocess.run([str(tools.tool("llama-completion")), "-m", str(base), "--lrq-adapter", str(adapter),
                           "-p", "hi", "-n", "1", "-no-cnv", "-t", str(THREADS)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and msg in proc.stderr, proc.stderr[-1500:]


def test_cpp_loads_the_good_files_of_the_table(files):
    toks = _tokens(2, 12)
    assert np.isfinite(_model(files.src, adapter=files.adapter).eval(toks)).all()


def test_a_map_and_an_adapter_are_not_combined(files):
    with pytest.raises(_native.LoadError, match="cannot be combined"):
        _native.Model(str(files.src), n_ctx=16, layers="0..2", adapter=str(files.adapter))


def test_a_missing_or_non_gguf_adapter_is_refused_by_name(files, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(_native.LoadError, match=f"adapter {re.escape(str(junk))}.*not a readable GGUF"):
        _native.Model(str(files.src), n_ctx=16, adapter=str(junk))
    with pytest.raises(OSError):
        _native.Model(str(files.src), n_ctx=16, adapter=str(tmp_path / "absent.gguf"))


# ---- serving ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_server_load_adapter", REPO / "bench" / "server_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_server_serves_base_plus_adapter(bench, iq2, tmp_path):
    base, adapter = iq2["base"], iq2["adapter"]
    model = _native.Model(str(base), n_ctx=128, n_threads=THREADS, adapter=str(adapter))
    toks = [int(t) for t in _tokens(9, 12)]
    seq = list(toks)
    for _ in range(SERVER_TOKENS):
        seq.append(int(model.eval(np.array(seq, np.int32))[-1].argmax()))
    with bench.Server(base, slots=1, ctx=128, threads=THREADS, http_threads=2, log_dir=tmp_path,
                      extra=["--lrq-adapter", str(adapter)]) as srv:
        body = json.dumps({"prompt": toks, "n_predict": SERVER_TOKENS, "temperature": 0,
                           "return_tokens": True}).encode()
        status, raw = bench.request(srv.port, "POST", "/completion", body, 60.0)
    assert status == 200, raw[:500]
    assert json.loads(raw)["tokens"] == seq[len(toks):]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(base, adapter, extra):
    proc = tools.run("llama-completion", ["-m", base, "--lrq-adapter", adapter, "-p", "the old man said", "-n", "8",
                                          "-no-cnv", "--temp", "0", "-t", "2", "--no-warmup", "-v", *extra],
                     timeout=120)
    return proc.stdout, proc.stderr


def test_rpc_server_runs_base_plus_adapter(files, tmp_path):
    base, adapter = tmp_path / "b.gguf", tmp_path / "a.gguf"
    split_lrq_file(files.stock, adapter, base)
    port = _free_port()
    server = subprocess.Popen([str(tools.tool("rpc-server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stdout.read()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "rpc-server did not listen"
            time.sleep(0.2)
        text_rpc, log_rpc = _complete(base, adapter, ["--rpc", f"127.0.0.1:{port}", "-ngl", "99"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    text_cpu, _ = _complete(base, adapter, [])
    sizes = re.findall(r"RPC0\[127\.0\.0\.1:\d+\] model buffer size =\s*([0-9.]+) MiB", log_rpc)
    assert sizes and max(map(float, sizes)) > 0, log_rpc[-2000:]
    assert "adapter" in log_rpc and text_rpc == text_cpu, log_rpc[-3000:]
