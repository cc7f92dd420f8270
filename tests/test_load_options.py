"""Load-time layer maps (--lrq-layers, docs/FORMAT.md 7.1) in the patched llama.cpp and the binding.

- the C++ parser gives the verdicts and messages of tests/test_layer_map.py's one table (the
  Python parser's): every good map runs that many executions, every bad one is refused with the
  same words, naming the map and the layer count;
- a map on a stock GGUF is bit-identical to the LRQ file lrq-convert writes for the same map
  (`--plan MAP`), and that file matches the float64 reference executor running the schedule;
- the extra executions alias the base weights (the loaded size does not grow) and have their own
  KV cache (llama.cpp's memory report counts one layer per execution);
- every patched tool takes the flag (llama-completion, -perplexity, -bench, -server, -cli's parser)
  and refuses an invalid map with a non-zero exit.
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from lrq import _native, tools
from lrq.convert import ConvertOptions, convert
from lrq.model_file import open_model
from lrq.reference import Reference
from numerics import nmse
from test_layer_map import BAD_MAPS, GOOD_MAPS
from tiny_models import TINY_VOCAB, make_tiny_gguf

THREADS = 2
# An F32 base runs ggml's F32 matmul: with an F32 KV cache and no flash attention only float32
# rounding separates the graph from the float64 reference (tests/test_stock_base.py measured
# 3.9e-13 .. 4.4e-12 on the same tiny models).  A graph that ran the map's layers in another order,
# or reused one execution's KV cache for another, differs by the control below (> 0.01).
EXACT_NMSE = 1e-9
# The control: the base without the map.  A map that adds or reorders executions changes the
# model far more than rounding (measured > 0.05 on these maps); asserted so that the exactness
# checks above cannot pass on a map that does nothing.
MAP_CHANGES_MODEL_NMSE = 1e-3
MAPS = ["0..1,0..1", "1x3", "1,0,1", "0x2,1,0"]


@pytest.fixture(scope="module")
def tiny_by_layers(tmp_path_factory):
    """F32 tiny llama models of 2, 3 and 4 layers (the layer counts of the map table)."""
    root = tmp_path_factory.mktemp("tiny-layers")
    return {n: make_tiny_gguf("llama", root / f"l{n}", num_hidden_layers=n) for n in (2, 3, 4)}


def _tokens(seed: int, n: int) -> np.ndarray:
    t = np.random.default_rng(seed).integers(3, TINY_VOCAB, size=n).astype(np.int32)
    t[0] = 1
    return t


def _run(tool: str, args: list, timeout: float = 180) -> subprocess.CompletedProcess:
    """A patched tool, whatever its exit status (tools.run raises on a non-zero one)."""
    return subprocess.run([str(tools.tool(tool)), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _model(path, **kw):
    return _native.Model(str(path), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0, **kw)


# ---- the parser ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,n_layer,want", GOOD_MAPS, ids=[g[0] for g in GOOD_MAPS])
def test_cpp_parser_runs_every_good_map(tiny_by_layers, spec, n_layer, want):
    m = _native.Model(str(tiny_by_layers[n_layer]), n_ctx=8, n_threads=THREADS, layers=spec)
    assert m.n_layer == len(want)
    assert f"layer map '{spec}'" in m.desc and f"-> {len(want)} executions" in m.desc, m.desc


@pytest.mark.parametrize("spec,n_layer,msg", [b for b in BAD_MAPS if b[0].strip()],
                         ids=[b[0][:20] for b in BAD_MAPS if b[0].strip()])
def test_cpp_parser_refuses_every_bad_map_in_pythons_words(tiny_by_layers, spec, n_layer, msg):
    with pytest.raises(_native.LoadError) as ei:
        _native.Model(str(tiny_by_layers[n_layer]), n_ctx=8, n_threads=THREADS, layers=spec)
    text = str(ei.value)
    assert msg in text and f"layer map '{spec}' (a model with {n_layer} layers)" in text, text


def test_an_empty_map_is_no_map(tiny_by_layers):
    # layers="" is the binding's default (no option), as an absent --lrq-layers; the tools refuse
    # an explicitly empty value (test_tools_take_the_flag_and_refuse_a_bad_map)
    path = tiny_by_layers[2]
    toks = _tokens(1, 16)
    np.testing.assert_array_equal(_model(path, layers="").eval(toks), _model(path).eval(toks))


# ---- what a map computes -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", MAPS)
def test_map_equals_converted_plan_and_reference(tiny_by_layers, tmp_path, spec):
    base = tiny_by_layers[2]
    conv = tmp_path / "conv.gguf"
    # a stock-typed F32 base (format v2): the same F32 weights, the map's schedule in the file
    convert(base, conv, ConvertOptions(base_type="F32", plan=spec, work=str(tmp_path / "w"), progress=False))
    toks = _tokens(7, 40)
    got = _model(base, layers=spec).eval(toks)
    np.testing.assert_array_equal(got, _model(conv).eval(toks))
    assert nmse(got, Reference(open_model(conv)).logits(toks)) < EXACT_NMSE
    assert nmse(got, _model(base).eval(toks)) > MAP_CHANGES_MODEL_NMSE


def test_map_aliases_weights_and_gives_each_execution_a_kv_cache(tiny_by_layers):
    base = tiny_by_layers[2]
    plain, mapped = _model(base), _model(base, layers="0..1,0..1,1x2")
    assert mapped.n_layer == 6 and plain.n_layer == 2
    assert mapped.size_bytes == plain.size_bytes     # no weight is copied
    proc = _run("llama-completion", ["-m", base, "--lrq-layers", "0..1,0..1,1x2", "-p", "hello", "-n", "2",
                                     "-no-cnv", "-t", THREADS, "-c", "64", "--no-warmup", "-v"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    kv = re.search(r"llama_kv_cache: size = .*?(\d+) layers", proc.stderr)
    assert kv and int(kv.group(1)) == 6, proc.stderr[-2000:]


# ---- the tools -----------------------------------------------------------------------------------

def test_tools_take_the_flag_and_refuse_a_bad_map(tiny_by_layers, tmp_path):
    base = str(tiny_by_layers[2])
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["hello world the old man said"] * 200))
    ok = {
        # -v: the model description (with the map) is an info line
        "llama-completion": ["-m", base, "-p", "hello", "-n", "2", "-no-cnv", "-c", "64", "-v"],
        "llama-perplexity": ["-m", base, "-f", text, "-c", "32", "--chunks", "2", "-b", "32", "-v"],
        "llama-bench": ["-m", base, "-p", "8", "-n", "2", "-r", "1", "-v"],
    }
    for tool, args in ok.items():
        proc = _run(tool, [*args, "-t", THREADS, "--lrq-layers", "1x2"])
        assert proc.returncode == 0, (tool, proc.stderr[-2000:])
        assert "layer map '1x2'" in proc.stdout + proc.stderr, (tool, proc.stderr[-2000:])
        bad = _run(tool, [*args, "-t", THREADS, "--lrq-layers", "0..5"])
        assert bad.returncode != 0, tool
        assert "layer map '0..5' (a model with 2 layers): layer 2 does not exist" in bad.stdout + bad.stderr, tool
    # llama-cli and llama-server share common's parser: the flag is in their help and refused
    # empty (llama-server's serving is tests/test_load_options_adapter.py)
    for tool in ("llama-cli", "llama-server"):
        h = _run(tool, ["--help"], timeout=60)
        assert "--lrq-layers" in h.stdout and "--lrq-adapter" in h.stdout, tool
        e = _run(tool, ["-m", base, "--lrq-layers", ""], timeout=60)
        assert e.returncode != 0 and "--lrq-layers: an empty value" in e.stdout + e.stderr, tool
