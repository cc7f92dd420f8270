"""Stock-typed bases (format v2): llama-quantize's codes shared by replicas with gain / bias / clip.

`lrq-convert --base-type TYPE` wraps llama-quantize's file; the patched llama.cpp runs replicas of
its block linears as ggml_mul_mat then ggml_mul (gain) / ggml_add (bias), after ggml_clamp (clip).
Checked here, on tiny random models whose linears are multiples of 256 wide (k-quants and
IQ2 types need that):

- the native logits against the float64 reference executor, which dequantizes the stock types
  with gguf-py independently of ggml: F32 bases exactly (the graph itself), IQ2_XS / Q2_K / Q4_K
  bases for plans none / all / parallel within a named bound, with a control that ignores the
  replica parameters;
- plan none without parameters equals stock llama.cpp on llama-quantize's own file, bit for bit;
- a serial replica with gain 0 on attn_output and ffn_down equals no replica, bit for bit;
- bad parameters, a v1 file with stock replicas, and converter misuse are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from lrq import _native, assets
from lrq.cli import convert as convert_cli
from lrq.cli import inspect as inspect_cli
from lrq.constants import FORMAT_VERSION, Keys
from lrq.convert import ConvertError, ConvertOptions, convert
from lrq.convert.update import set_replica_params
from lrq.eval.stock import make_imatrix, reference_f32
from lrq.lrq_file import LRQFileError, LRQModelFile
from lrq.model_file import open_model
from lrq.reference import Reference
from gguf_edit import rewrite
from numerics import nmse
from tiny_models import TINY_VOCAB, make_tiny_gguf

THREADS = 2
# An F32 base runs the stock F32 matmul: with an F32 KV cache and no flash attention only float32
# rounding separates the graph from the float64 reference (measured 3.9e-13 .. 4.4e-12).
EXACT_NMSE = 1e-9
# Quantized bases: ggml's CPU matmuls for k-quants / IQ2 types quantize the activations to 8 bits
# (Q8_K) and the tiny random models amplify that: measured 2.0e-3 .. 6.8e-3 on x86-64 with 2
# threads (deterministic for a build and thread count), the same order for every type, since the
# activation rounding dominates.  Each case has its own bound, about twice its measurement, and
# each bound is at least CONTROL_MARGIN times below its control, asserted: the same file read
# without its replica parameters (measured 0.68 .. 1.07), i.e. a graph that drops gain, bias or
# clip.  A wrong dequantization of the base type would be of the control's order too.
STOCK_NMSE = {
    ("llama", "IQ2_XS", "none"): 6.4e-3, ("llama", "IQ2_XS", "all"): 0.0134, ("llama", "IQ2_XS", "parallel"): 9.0e-3,
    ("llama", "Q2_K", "none"): 4.6e-3, ("llama", "Q2_K", "all"): 0.013, ("llama", "Q2_K", "parallel"): 8.5e-3,
    ("llama", "Q4_K", "none"): 5.2e-3, ("llama", "Q4_K", "all"): 0.0136, ("llama", "Q4_K", "parallel"): 8.4e-3,
    ("qwen2", "IQ2_XS", "parallel"): 8.1e-3, ("qwen3", "IQ2_XS", "parallel"): 4.1e-3,
}
CONTROL_MARGIN = 5.0
PARALLEL_PLAN = {"layers": {"0": {"replicas": 2, "mode": "serial"},
                            "1": {"replicas": 3, "mode": "parallel", "weights": [0.5, 0.3, 0.2]}}}
BASES = ["IQ2_XS", "Q2_K", "Q4_K"]
PLANS = ["none", "all", "parallel"]


class StockFiles:
    """Tiny 256-wide models, their imatrix, and v2 files made with lrq-convert --base-type."""

    def __init__(self, root: Path):
        self.root = root
        self.work = root / "work"
        self._src: dict[str, Path] = {}
        self._imat: dict[str, Path] = {}
        self._files: dict[tuple, Path] = {}

    def src(self, arch: str) -> Path:
        if arch not in self._src:
            self._src[arch] = make_tiny_gguf(arch, self.root / arch, hidden_size=256,
                                             intermediate_size=512, num_hidden_layers=2)
        return self._src[arch]

    def imatrix(self, arch: str) -> Path:
        if arch not in self._imat:
            # the tiny tokenizer has no byte fallback: one line of Botchan
            text = self.root / "botchan-line.txt"
            if not text.exists():
                text.write_text(" ".join(assets.text("botchan").split())[:60000])
            ref = reference_f32(self.src(arch), self.work)
            self._imat[arch] = make_imatrix(ref, text, chunks=8, ctx=128, work=self.work)
        return self._imat[arch]

    def get(self, arch: str, base: str, plan: str) -> Path:
        key = (arch, base, plan)
        if key not in self._files:
            spec = plan
            if plan == "parallel":
                spec = str(self.root / "parallel.json")
                Path(spec).write_text(json.dumps(PARALLEL_PLAN))
            out = self.root / f"{arch}-{base}-{plan}.gguf"
            im = None if base in ("F32", "Q4_K") else str(self.imatrix(arch))
            convert(self.src(arch), out, ConvertOptions(base_type=base, plan=spec, imatrix=im,
                                                        work=str(self.work), progress=False))
            self._files[key] = out
        return self._files[key]


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> StockFiles:
    return StockFiles(tmp_path_factory.mktemp("stock-base"))


def _tokens(seed: int, n: int) -> np.ndarray:
    t = np.random.default_rng(seed).integers(3, TINY_VOCAB, size=n).astype(np.int32)
    t[0] = 1
    return t


def _random_params(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """gain and bias on four linears of every (layer, replica) the schedule runs, a clip on two."""
    f = open_model(path)
    rng = np.random.default_rng(seed)
    out = {}
    for layer, r in sorted({(e.layer, e.replica) for e in f.schedule}):
        for stem in ("attn_q", "attn_output", "ffn_up", "ffn_down"):
            name = f"blk.{layer}.{stem}.weight"
            n_out = f.tensor_info(name).shape[0]
            pre = f"blk.{layer}.{stem}.lrq_r{r}."
            out[pre + "gain"] = (1 + 0.2 * rng.standard_normal(n_out)).astype(np.float32)
            out[pre + "bias"] = (0.05 * rng.standard_normal(n_out)).astype(np.float32)
        # bounds that bite: below the inputs' max |x| (a tiny model's normed inputs reach ~3)
        out[f"blk.{layer}.ffn_up.lrq_r{r}.clip"] = np.array([1.0 + 0.25 * r], np.float32)
        out[f"blk.{layer}.attn_q.lrq_r{r}.clip"] = np.array([1.5], np.float32)
    return out


def _with_params(path: Path, tmp: Path, params=None) -> Path:
    out = tmp / (path.stem + ".params.gguf")
    set_replica_params(path, out, _random_params(path) if params is None else params)
    return out


def _native_logits(path: Path, toks: np.ndarray, **kw) -> np.ndarray:
    return _native.Model(str(path), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0, **kw).eval(toks)


# ---- the file ------------------------------------------------------------------------------------

def test_stock_base_file_is_llama_quantize_output_plus_schedule(stock):
    path = stock.get("llama", "IQ2_XS", "all")
    f = LRQModelFile(path)
    assert f.version == FORMAT_VERSION and f.mode is None and f.group_size is None
    assert f.kv[Keys.BASE_TYPE] == "IQ2_XS" and f.kv[Keys.BASE_IMATRIX].endswith(".gguf")
    # every tensor byte for byte from llama-quantize's file, none added
    q = gguf.GGUFReader(next(stock.work.glob("*.IQ2_XS.imat.gguf")))
    r = gguf.GGUFReader(path)
    assert [t.name for t in r.tensors] == [t.name for t in q.tensors]
    for a, b in zip(r.tensors, q.tensors):
        assert a.tensor_type == b.tensor_type and bytes(a.data) == bytes(b.data), a.name
    assert {f.tensor_type(n) for n in f.replicable_weights()} >= {"IQ2_XS"}
    assert len(f.replicable_weights()) == 2 * 7
    # bpw of the block linears: an independent count over the tensors
    lin = [t for t in r.tensors if t.name.startswith("blk.") and t.name.endswith(".weight")
           and "norm" not in t.name]
    want = 8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin)
    assert f.bpw()["linears"] == pytest.approx(want) == pytest.approx(f.kv[Keys.BPW_LINEARS])
    # lrq-eval's table names the base by its type (it printed "LRQ? g?": no LRQ bits or group)
    from lrq.eval.bpw import file_bpw
    assert file_bpw(path).file_type == "IQ2_XS base"


# ---- logits: native against the reference --------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("plan", PLANS)
def test_f32_base_graph_is_exact(stock, tmp_path, arch, plan):
    path = _with_params(stock.get(arch, "F32", plan), tmp_path)
    toks = _tokens(7, 40)
    e = nmse(_native_logits(path, toks), Reference(open_model(path)).logits(toks))
    assert e < EXACT_NMSE, f"{arch} {plan}: NMSE {e:.3g}"


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("plan", PLANS)
def test_quantized_base_matches_reference(stock, tmp_path, base, plan):
    plain = stock.get("llama", base, plan)
    path = _with_params(plain, tmp_path)
    toks = _tokens(7, 40)
    got = _native_logits(path, toks)
    e = nmse(got, Reference(open_model(path)).logits(toks))
    bound = STOCK_NMSE[("llama", base, plan)]
    assert e < bound, f"{base} {plan}: NMSE {e:.3g}"
    control = nmse(got, Reference(open_model(plain)).logits(toks))
    assert control > CONTROL_MARGIN * bound, (control, bound)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_quantized_base_other_archs(stock, tmp_path, arch):
    plain = stock.get(arch, "IQ2_XS", "parallel")
    path = _with_params(plain, tmp_path)
    toks = _tokens(8, 40)
    got = _native_logits(path, toks)
    e = nmse(got, Reference(open_model(path)).logits(toks))
    bound = STOCK_NMSE[(arch, "IQ2_XS", "parallel")]
    assert e < bound, f"{arch}: NMSE {e:.3g}"
    assert nmse(got, Reference(open_model(plain)).logits(toks)) > CONTROL_MARGIN * bound


# ---- exact equalities ----------------------------------------------------------------------------

def test_plan_none_equals_stock_llama_cpp(stock):
    # same codes, same graph: the LRQ file and llama-quantize's own file give identical logits
    path = stock.get("llama", "Q2_K", "none")
    q = next(stock.work.glob("*.Q2_K.imat.gguf"))
    toks = _tokens(3, 40)
    np.testing.assert_array_equal(_native_logits(path, toks), _native_logits(q, toks))


def test_zero_gain_serial_replica_equals_no_replica(stock, tmp_path):
    path = stock.get("llama", "IQ2_XS", "all")          # every layer twice, serial
    f = open_model(path)
    params = {}
    for layer in range(2):
        for stem in ("attn_output", "ffn_down"):
            n_out = f.tensor_info(f"blk.{layer}.{stem}.weight").shape[0]
            params[f"blk.{layer}.{stem}.lrq_r1.gain"] = np.zeros(n_out, np.float32)
        # whatever else replica 1 does, its block now adds nothing to the residual stream
        params[f"blk.{layer}.attn_q.lrq_r1.gain"] = np.full(256, 3.0, np.float32)
        params[f"blk.{layer}.ffn_up.lrq_r1.clip"] = np.array([0.5], np.float32)
    noop = _with_params(path, tmp_path, params)
    toks = _tokens(4, 40)
    np.testing.assert_array_equal(_native_logits(noop, toks),
                                  _native_logits(stock.get("llama", "IQ2_XS", "none"), toks))
    # and the doubled layers without the zero gains are a different model
    assert nmse(_native_logits(path, toks), _native_logits(noop, toks)) > 0.1


# ---- refusals ------------------------------------------------------------------------------------

def test_stock_replica_params_are_validated(stock, tmp_path):
    path = stock.get("llama", "Q4_K", "all")
    for name, value, expect in (
            ("blk.0.ffn_up.lrq_r1.clip", np.array([0.0], np.float32), "clip bound must be > 0"),
            ("blk.0.ffn_up.lrq_r1.clip", np.array([1.0, 2.0], np.float32), "expected [1]"),
            ("blk.0.ffn_up.lrq_r1.scale_mult", np.ones((512, 1), np.float16), "takes gain, bias, clip"),
            ("blk.0.ffn_up.lrq_r1.act", np.array([0.9, 0], np.float32), "takes gain, bias, clip"),
            ("blk.0.ffn_up.lrq_r5.gain", np.ones(512, np.float32), "never runs replica 5"),
            ("token_embd.lrq_r0.gain", np.ones(256, np.float32), "is not an LRQ weight")):
        with pytest.raises(ConvertError) as ei:
            set_replica_params(path, tmp_path / "bad.gguf", {name: value})
        assert name in str(ei.value) and expect in str(ei.value), str(ei.value)
    assert not (tmp_path / "bad.gguf").exists()


def test_loaders_refuse_bad_stock_replicas(stock, tmp_path):
    path = stock.get("llama", "F32", "all")
    U32 = gguf.GGUFValueType.UINT32
    F32, F16 = int(gguf.GGMLQuantizationType.F32), int(gguf.GGMLQuantizationType.F16)
    cases = [
        # a v1 file cannot have a stock-typed base at all
        (rewrite(path, tmp_path / "v1.gguf", kv={Keys.FORMAT_VERSION: (1, U32)}), "format version 1"),
        (rewrite(path, tmp_path / "neg-clip.gguf",
                 add={"blk.0.ffn_up.lrq_r1.clip": (np.array([-1.0], np.float32), F32)}),
         "blk.0.ffn_up.lrq_r1.clip"),
        (rewrite(path, tmp_path / "grid.gguf",
                 add={"blk.0.ffn_up.lrq_r1.grid_offset": (np.zeros((512, 1), np.float16), F16)}),
         "blk.0.ffn_up.lrq_r1.grid_offset"),
    ]
    for bad, expect in cases:
        with pytest.raises(LRQFileError) as ei:
            LRQModelFile(bad)
        assert str(bad) in str(ei.value) and expect in str(ei.value), str(ei.value)
        with pytest.raises(_native.LoadError) as ei:
            _native.Model(str(bad), n_ctx=32, n_threads=1)
        assert expect in str(ei.value), str(ei.value)[-2000:]


def test_convert_refuses_misuse(stock, tmp_path, capsys):
    src = stock.src("llama")
    out = tmp_path / "x.gguf"
    with pytest.raises(ConvertError, match="IQ2_XS needs an importance matrix"):
        convert(src, out, ConvertOptions(base_type="IQ2_XS", work=str(stock.work), progress=False))
    with pytest.raises(ConvertError, match="--gptq only apply to LRQ codes"):
        convert(src, out, ConvertOptions(base_type="Q4_K", gptq=True, calib_text="x", progress=False))
    with pytest.raises(ConvertError, match="invalid ftype 'FOO'"):
        convert(src, out, ConvertOptions(base_type="FOO", work=str(stock.work), progress=False))
    with pytest.raises(ConvertError, match="--imatrix .* needs --base-type"):
        convert(src, out, ConvertOptions(imatrix="x.gguf", progress=False))
    assert convert_cli.main([str(src), str(out), "--base-type", "Q4_K", "--bits", "3"]) == 2
    assert "--bits" in capsys.readouterr().err
    assert not out.exists()


def test_cli_round_trip(stock, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert convert_cli.main([str(stock.src("llama")), str(out), "--base-type", "Q4_K", "--plan", "last-1",
                             "--work", str(stock.work), "-q"]) == 0
    capsys.readouterr()
    assert inspect_cli.main([str(out), "--no-tensors"]) == 0
    text = capsys.readouterr().out
    assert "stock-typed base: llama-quantize Q4_K" in text and "2 layers" in text
    assert [e.layer for e in LRQModelFile(out).schedule] == [0, 1, 1]
