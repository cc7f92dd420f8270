"""The lockstep order of parallel groups (native/lrq/lrq-graph.cpp, patch 0013) and the fused
runs of same-codes nodes it makes (ggml-cpu, patch 0014).

After llama.cpp builds the graph of a model with parallel groups, the nodes of each group are
reordered so that the members run each linear back to back (their k-th LRQ_MUL_MATs over the same
codes adjacent).  The same ops run on the same inputs, so the logits must be bit-identical with the
order switched off (LRQ_NO_LOCKSTEP=1); the reorder must really happen (llama.cpp's log counts the
adjacent same-codes LRQ pairs); and the logits stay within the bounds of the float64 reference
executor (lrq.reference, which reads the file independently) that tests/test_runtime.py uses.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lrq import tools
from lrq.convert import ConvertOptions, convert
from lrq.model_file import open_model
from lrq.reference import Reference
from numerics import nmse
from tiny_models import TINY_VOCAB, make_tiny_gguf

from lrq import _native

THREADS = 2

# 4 layers: a serial pair, a 2-member and a 3-member parallel group, and a plain layer, so that a
# group sits between serial / plain executions on both sides and one group is not the last
# execution (whose combine also runs on the output rows only).
PLAN = {"layers": {"0": {"replicas": 2, "mode": "serial"},
                   "1": {"replicas": 2, "mode": "parallel", "weights": [0.6, 0.4]},
                   "3": {"replicas": 3, "mode": "parallel", "weights": [0.5, 0.3, 0.2]}}}
# 7 linears per block (q, k, v, o, gate, up, down): a group of m members in lockstep has m - 1
# adjacent same-codes pairs per linear.  In a graph whose last execution keeps only the output rows
# (inp_out_ids) the last member's 3 FFN linears take fewer rows than the others': not a pair.
LINEARS = 7
PAIRS = LINEARS * (2 - 1) + LINEARS * (3 - 1)
PAIRS_REDUCED = PAIRS - 3

# The same graph in another node order computes every node from the same inputs with the same
# kernel: bit-identical logits.  Any dependency the reorder broke (a read of the KV cache before
# its write, a member reading another's unfinished node) changes them.
SAME = 0.0
# Against the float64 reference with the op on the spec's arithmetic (LRQ_CPU_REF=1), F32 KV, no
# flash attention: tests/test_runtime.py's EXACT_NMSE (measured <= 8e-12 there); a dropped or
# doubled group member gives NMSE > 0.5 (test_runtime's control), far outside.
EXACT_NMSE = 1e-9


def _tokens(seed: int, n: int) -> np.ndarray:
    t = np.random.default_rng(seed).integers(3, TINY_VOCAB, size=n).astype(np.int32)
    t[0] = 1
    return t


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lockstep")
    src = make_tiny_gguf("qwen2", root / "src", num_hidden_layers=4)
    plan = root / "plan.json"
    plan.write_text(json.dumps(PLAN))
    out = {}
    # LRQ codes with replicas on shifted / stretched grids (they differ, so a member mixed up
    # with another changes the logits)
    out["lrq"] = root / "lrq.gguf"
    convert(src, out["lrq"], ConvertOptions(bits=2, group_size=32, plan=str(plan), grid_offset=0.5,
                                            scale_delta=0.1, progress=False))
    out["serial"] = root / "serial.gguf"
    convert(src, out["serial"], ConvertOptions(bits=2, group_size=32, plan="last-1", grid_offset=0.5,
                                               progress=False))
    # a stock-typed base: the members' linears are stock mul_mats of one weight
    out["stock"] = root / "stock.gguf"
    convert(src, out["stock"], ConvertOptions(base_type="Q4_0", plan=str(plan), work=str(root / "work"),
                                              progress=False))
    return out


def _logits(path: Path, toks: np.ndarray, monkeypatch, lockstep: bool, **kw) -> np.ndarray:
    # the switch is read whenever a graph is built, i.e. when the context is made and on a change
    # of batch shape
    with monkeypatch.context() as m:
        if lockstep:
            m.delenv("LRQ_NO_LOCKSTEP", raising=False)
        else:
            m.setenv("LRQ_NO_LOCKSTEP", "1")
        model = _native.Model(str(path), n_ctx=64, n_threads=THREADS, **kw)
        return model.eval(toks)


def _pairs_logged(path: Path, env: dict | None = None) -> tuple[list[int], str]:
    """Adjacent same-codes LRQ pairs of every graph shape from the log lines of lrq_lockstep (-v:
    INFO lines; one when the count changes), and the rest of the last line."""
    import os
    proc = subprocess.run([str(tools.tool("llama-perplexity")), "-m", str(path), "-f", "/dev/null", "-c", "64",
                           "-t", "1", "-v"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    m = re.findall(r"lrq_lockstep: (.*?), (\d+) adjacent same-codes LRQ pairs", proc.stderr)
    assert m, proc.stderr[-3000:]
    assert "graph left in its built order" not in proc.stderr, proc.stderr[-3000:]
    return [int(x[1]) for x in m], m[-1][0]


@pytest.mark.parametrize("kind", ["lrq", "stock"])
@pytest.mark.parametrize("n_batch", [64, 1])   # prompt graph, and decode graphs of one token
def test_lockstep_logits_are_bit_identical(files, monkeypatch, kind, n_batch):
    toks = _tokens(1, 24)
    on = _logits(files[kind], toks, monkeypatch, True, n_batch=n_batch)
    off = _logits(files[kind], toks, monkeypatch, False, n_batch=n_batch)
    assert np.isfinite(on).all()
    assert float(np.max(np.abs(on - off))) == SAME


@pytest.mark.parametrize("n_batch", [64, 1])
def test_fused_members_are_bit_identical(files, monkeypatch, n_batch):
    """ggml-cpu hands each run of adjacent same-codes LRQ nodes to one call (patch 0014,
    lrq_mul_mat_q8_multi: one pass over the codes for every member); LRQ_NO_FUSE=1 computes them
    one node at a time.  Each member's arithmetic is its own, so the logits are bit-identical.
    A run that gave every member the first member's replica parameters, or the first member's
    activations, changes them (checked by breaking lrq-cpu.c so: max |diff| 3.2 and 3.0)."""
    toks = _tokens(3, 24)
    fused = _logits(files["lrq"], toks, monkeypatch, True, n_batch=n_batch)
    monkeypatch.setenv("LRQ_NO_FUSE", "1")
    apart = _logits(files["lrq"], toks, monkeypatch, True, n_batch=n_batch)
    assert np.isfinite(fused).all()
    assert float(np.max(np.abs(fused - apart))) == SAME


def test_lockstep_matches_reference(files, monkeypatch):
    monkeypatch.setenv("LRQ_CPU_REF", "1")   # the op on the spec's arithmetic
    toks = _tokens(2, 24)
    got = _logits(files["lrq"], toks, monkeypatch, True, kv_f32=True, flash_attn=0)
    ref = Reference(open_model(files["lrq"])).logits(toks)
    assert nmse(got, ref) < EXACT_NMSE


def test_lockstep_makes_same_codes_linears_adjacent(files):
    pairs, what = _pairs_logged(files["lrq"])
    assert set(pairs) == {PAIRS, PAIRS_REDUCED}, pairs
    assert what.startswith("2 of 2 parallel groups"), what
    # switched off, and without parallel groups: the built order has no such pair
    assert _pairs_logged(files["lrq"], {"LRQ_NO_LOCKSTEP": "1"})[0] == [0]
    assert _pairs_logged(files["serial"])[0] == [0]
