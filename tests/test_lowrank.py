"""Per-replica low-rank corrections y += U (V x) (format v3, docs/FORMAT.md 6.2).

- the SVD initialisation (lrq.calib.replica.lowrank_init) leaves exactly the weighted error the
  truncated SVD predicts (Eckart-Young, checked with numpy's SVD of the same matrix), and wrong
  initialisations (no activation weighting, D not undone on V) do not;
- lrq-calibrate --lowrank 8 ends below --lowrank 0 on the calibration loss, and what it measured
  is what the written file does in the reference executor; the file holds the factors it says
  (F16, rank 8, format v3) and its bpw counts them;
- the patched llama.cpp (two ggml_mul_mat and an add per linear) against the float64 reference
  on tiny LRQ-typed and stock-typed files, F16 and Q8_0 factors, with controls showing that
  ignoring the factors, applying them to the clipped input or scaling them by the gain falls
  outside the bound.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lrq import _native  # built by `make build`; a missing build must fail, not skip
from lrq.calib import calibration_windows
from lrq.calib.activations import LINEARS, SourceActivations
from lrq.calib.calibrate import CalibrateOptions, calibrate, calibration_loss
from lrq.calib.replica import ReplicaLinear, StockReplicaLinear, lowrank_init
from lrq.constants import FORMAT_VERSION, LOWRANK_VERSION, replica_param_name
from lrq.convert import ConvertOptions, convert
from lrq.convert.update import set_replica_params
from lrq.lrq_file import LRQModelFile
from lrq.reference import Reference, ops
from numerics import nmse
from tiny_models import TINY_VOCAB, tiny_calib_text

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N_WIN, WINDOW = 4, 128
# lowrank_init returns float32 factors of a float64 SVD: the residual's squared norm then differs
# from the SVD tail by float32 rounding of U V, ~1e-7 of ||E||^2.  An initialisation without the
# activation weighting, or one that leaves D on V, misses the tail by > 1e-2 of ||E||^2 on these
# linears (asserted below), so 1e-5 separates them.
SVD_TAIL_ATOL = 1e-5
# two float32 paths through the same blocks (the calibrator's modules, the reference executor on
# the written file) differ only by rounding order (tests/test_calib.py: LOSS_RTOL)
LOSS_RTOL = 1e-3
# rank 8 must buy a clear improvement over rank 0 on the tiny model's 2-bit codes (measured: the
# calibration loss falls to about a third); a correction that is ignored, or trained away, gives 1
LOWRANK_LOSS_RATIO_MAX = 0.8
RANK = 8
# an embedded no-op replica changes a layer's output by float32 rounding only (the serial step
# x -> B_0(x) -> B_1(.) with B_1 adding exactly 0); a nonzero U on the extra replica moves the
# loss by far more than this
EMBED_RTOL = 1e-6

# Native (LRQ_CPU_REF=1, F32 KV, no flash attention: the rest of the graph is exact to ~1e-11,
# tests/test_runtime.py) against the float64 reference.  What remains is the CPU backend's own
# rounding of the activations for the factor products: to F16 (F16 factors), to Q8_0 blocks
# (Q8_0 factors), amplified by the chaotic random model.  Measured NMSE: LRQ-typed 3-bit base,
# F16 rank 8: 3.0e-6; F32 stock base, F16 rank 8: 1.6e-6; F32 stock base, Q8_0 rank 32: 1.5e-3.
# Each bound is 2-3x its measurement; every control is > CONTROL_MARGIN x it (measured, in the
# order of the cases: factors ignored 0.073 / 1.9 / 2.2; factors on the clipped input
# 0.024 / 1.8 / 1.5; factors scaled by the gain 0.17 / 0.33 / 0.46).
NATIVE_NMSE = {("lrq", "F16"): 1e-5, ("stock", "F16"): 5e-6, ("stock", "Q8_0"): 4e-3}
CONTROL_MARGIN = 10.0
# perplexity (n_ctx 32: the last execution keeps only the scored rows, inp_out_ids) relative to
# the reference's, the same cases: measured 1.9e-5 / 6.8e-4 / 3.0e-3; bounds ~3x
NATIVE_PPL_REL = {("lrq", "F16"): 1e-4, ("stock", "F16"): 2e-3, ("stock", "Q8_0"): 1e-2}
PLAN = {"layers": {"0": {"replicas": 2, "mode": "serial"}, "2": {"replicas": 2, "mode": "parallel"}}}


@pytest.fixture(scope="module")
def src(tiny_models):
    return tiny_models.gguf("llama")


@pytest.fixture(scope="module")
def windows(src, tmp_path_factory):
    text = tiny_calib_text(src, tmp_path_factory.mktemp("lowrank-text") / "calib.txt")
    return calibration_windows(src, text, n_tokens=N_WIN * WINDOW, window=WINDOW)


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("lowrank-files")
    out = d / "none.gguf"
    convert(src, out, ConvertOptions(bits=2, group_size=32, plan="none", progress=False))
    return out


# ---- the SVD initialisation --------------------------------------------------------------------

def _weighted_err(w_f, w_r, u, v, d) -> float:
    return float(np.sum(((w_f - w_r - u.astype(np.float64) @ v.astype(np.float64)) * d) ** 2))


def test_svd_init_leaves_the_svd_tail(src, windows, converted):
    acts = SourceActivations(src, windows)
    stats = acts.linear_stats(1)
    f, fp = LRQModelFile(converted), acts.block(1)
    for name in LINEARS:
        wn = f"blk.1.{name}.weight"
        w_f = fp.lin[name].weight.double().numpy()
        m = ReplicaLinear(f.quantized(wn), f.replica_params(wn, 0), lowrank=RANK)
        w_r = m.weight().detach().double().numpy()
        sq = stats[name].sq_mean
        d = np.sqrt(sq)[None, :]
        s = np.linalg.svd((w_f - w_r) * d, compute_uv=False)          # the independent SVD
        total, tail = float(np.sum(s ** 2)), float(np.sum(s[RANK:] ** 2))
        m.init_lowrank(w_f, sq)
        u, v = m.lr_u.detach().numpy(), m.lr_v.detach().numpy()
        got = _weighted_err(w_f, w_r, u, v, d)
        assert abs(got - tail) <= SVD_TAIL_ATOL * total, (name, got, tail, total)
        assert tail < 0.9 * total                                     # the init does something
        # controls: no activation weighting; D left on V
        u0, v0 = lowrank_init(w_f, w_r, np.ones_like(sq), RANK)
        bad_plain = _weighted_err(w_f, w_r, u0, v0, d)
        bad_d = _weighted_err(w_f, w_r, u, v * d, d)
        assert min(bad_plain, bad_d) - tail > 1e3 * SVD_TAIL_ATOL * total, (name, bad_plain, bad_d, tail)


def test_stock_module_init_and_storage():
    """The stock-typed module takes the same init; its export and round_to_storage give F16
    values of the same factors; zero factors (before the init) change nothing."""
    rng = np.random.default_rng(0)
    w_f = rng.standard_normal((48, 64))
    w_q = (w_f + 0.1 * rng.standard_normal((48, 64))).astype(np.float32)     # the module keeps float32
    sq = rng.uniform(0.1, 2.0, 64)
    m = StockReplicaLinear(w_q, lowrank=4)
    x = torch.from_numpy(rng.standard_normal((10, 64)).astype(np.float32))
    assert torch.equal(m(x), x @ m.w.T)                               # zero factors: no change
    m.init_lowrank(w_f, sq)
    u, v = lowrank_init(w_f, w_q, sq, 4)
    assert np.array_equal(m.lr_u.detach().numpy(), u) and np.array_equal(m.lr_v.detach().numpy(), v)
    m.round_to_storage()
    ex = m.export()
    assert np.array_equal(ex["lr_u"], u.astype(np.float16).astype(np.float32))
    want = x.double() @ torch.from_numpy(w_q).double().T + (x.double() @ torch.from_numpy(ex["lr_v"]).double().T) \
        @ torch.from_numpy(ex["lr_u"]).double().T
    assert torch.allclose(m(x).double(), want, rtol=1e-5, atol=1e-5)


# ---- the calibrator ----------------------------------------------------------------------------

def test_calibration_with_rank_8_beats_rank_0(src, windows, converted, tmp_path):
    res = {}
    for rank in (0, RANK):
        out = tmp_path / f"r{rank}.gguf"
        s = calibrate(converted, out, src, CalibrateOptions(steps=20, lowrank=rank, progress=False),
                      windows=windows)
        loss = calibration_loss(out, src, windows)
        # what the calibrator measured is what the written file does in the reference executor
        assert loss == pytest.approx(s.final_loss, rel=LOSS_RTOL)
        res[rank] = (out, loss)
    assert res[RANK][1] < LOWRANK_LOSS_RATIO_MAX * res[0][1], (res[RANK][1], res[0][1])
    f0, f = LRQModelFile(res[0][0]), LRQModelFile(res[RANK][0])
    assert f.version == FORMAT_VERSION >= LOWRANK_VERSION     # writers write the current version
    extra = 0
    for wn in f.replicable_weights():
        n_out, n_in = f.tensor_info(wn).shape
        u, v = (f.tensor_info(replica_param_name(wn, 0, p)) for p in ("lr_u", "lr_v"))
        assert (u.type_name, u.shape, v.type_name, v.shape) == ("F16", (n_out, RANK), "F16", (RANK, n_in))
        assert not f0.has_tensor(replica_param_name(wn, 0, "lr_u"))
        extra += 2 * RANK * (n_out + n_in)                            # bytes of two F16 factors
    # the factors count in the bits of the weights they correct (FORMAT.md section 9)
    b0, b = f0.bpw(), f.bpw()
    assert b["lrq"] == pytest.approx(b0["lrq"] + 8 * extra / b0["n_lrq_weights"], rel=1e-12)
    assert b["n_lrq_weights"] == b0["n_lrq_weights"] and b["n_base_params"] == b0["n_base_params"]


def test_replicated_calibration_with_factors(src, windows, tmp_path):
    """Every layer twice (serial) with rank-4 factors and no Adam steps: running a copy twice is
    far worse than once, so every layer must fall back to replica 0 alone embedded exactly —
    the extra replica an exact no-op, which with factors needs U = 0 on its output linears as
    well as gain = bias = 0 (without it the embedded layer's loss moves off replica 0's) — and
    the file does what the calibrator measured."""
    base = tmp_path / "all.gguf"
    convert(src, base, ConvertOptions(bits=2, group_size=32, plan="all", progress=False))
    out = tmp_path / "all.cal.gguf"
    s = calibrate(base, out, src, CalibrateOptions(steps=0, serial_init="zero", lowrank=4, progress=False),
                  windows=windows[:2])
    assert calibration_loss(out, src, windows[:2]) == pytest.approx(s.final_loss, rel=LOSS_RTOL)
    for r in s.layers:
        assert r.replicas == [0, 1] and r.choice == "norep", r
        assert r.loss == pytest.approx(r.loss_norep, rel=EMBED_RTOL), r
    f = LRQModelFile(out)
    assert f.tensor_info("blk.2.ffn_down.lrq_r1.lr_u").shape == (64, 4)
    assert not f.tensor("blk.2.ffn_down.lrq_r1.lr_u").any()


def test_bad_lowrank_option(src, converted, tmp_path):
    from lrq.calib import CalibError
    with pytest.raises(CalibError, match="--lowrank"):
        calibrate(converted, tmp_path / "x.gguf", src, CalibrateOptions(lowrank=65, progress=False))
    assert not (tmp_path / "x.gguf").exists()


# ---- the runtime against the reference ---------------------------------------------------------

def _extras(base: Path, rank: int) -> dict[str, np.ndarray]:
    """Random factors on every replicable linear of every replica (a correction ~0.3 of the
    weight's largest gain), with gains and input clips, so that a misplaced correction shows."""
    f, rng, out = LRQModelFile(base), np.random.default_rng(3), {}
    for wn in f.replicable_weights():
        layer = int(wn.split(".")[1])
        n_out, n_in = f.tensor_info(wn).shape
        sd = np.sqrt(0.3 * np.linalg.norm(f.tensor(wn), 2) / np.sqrt(rank * n_in))
        for r in sorted({e.replica for e in f.schedule if e.layer == layer}):
            p = lambda n: replica_param_name(wn, r, n)
            out[p("lr_u")] = sd * rng.standard_normal((n_out, rank))
            out[p("lr_v")] = sd * rng.standard_normal((rank, n_in))
            out[p("gain")] = (1 + 0.2 * rng.standard_normal(n_out)).astype(np.float32)
            if f.is_lrq(wn):
                out[p("act")] = np.array([0.7, 0], np.float32)
            else:
                out[p("clip")] = np.array([0.5], np.float32)
    return out


@pytest.fixture(scope="module")
def runtime_files(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("lowrank-runtime")
    plan = d / "plan.json"
    plan.write_text(json.dumps(PLAN))
    bases = {"lrq": d / "lrq.base.gguf", "stock": d / "stock.base.gguf"}
    convert(src, bases["lrq"], ConvertOptions(bits=3, group_size=32, plan=str(plan), grid_offset=0.5,
                                              scale_delta=0.1, progress=False))
    convert(src, bases["stock"], ConvertOptions(base_type="F32", plan=str(plan), work=str(d / "work"),
                                                progress=False))
    out = {}
    for base, typ in NATIVE_NMSE:
        rank = 8 if typ == "F16" else 32          # Q8_0 U needs rows (the rank) of whole blocks
        out[(base, typ)] = set_replica_params(bases[base], d / f"{base}-{typ}.gguf", _extras(bases[base], rank),
                                              lowrank_type=typ)
    return out


_LINEAR_CALL = ops.Linear.__call__


def _plain(lin: ops.Linear) -> ops.Linear:
    return ops.Linear(lin.weight, lin.bias, lin.gain, lin.replica_bias, lin.act_clip, lin.act_bits, lin.clip)


def _ignored(self, x):
    return _LINEAR_CALL(_plain(self), x)


def _on_clipped(self, x):
    y = _LINEAR_CALL(_plain(self), x)
    if self.clip != float("inf"):
        x = x.clamp(-self.clip, self.clip)
    x = ops.act_clip_quant(x, self.act_clip, self.act_bits)
    return y + (x @ self.lr_v.T) @ self.lr_u.T


def _gain_scaled(ref: Reference, f: LRQModelFile) -> Reference:
    """The control that scales each correction by its replica's gain (the reference folds an
    LRQ-typed weight's gain into W, so the gain is taken from the file)."""
    for (layer, r), blk in ref.blocks.items():
        for name, lin in blk.lin.items():
            gain = f.replica_params(f"blk.{layer}.{name}.weight", r).gain
            if lin.lr_u is not None and gain is not None:
                lin.lr_u = lin.lr_u * torch.from_numpy(gain)[:, None]
    return ref


@pytest.mark.parametrize("case", list(NATIVE_NMSE), ids=lambda c: "-".join(c))
def test_native_matches_reference(runtime_files, case, monkeypatch):
    path = runtime_files[case]
    f = LRQModelFile(path)
    lr = [n for n in f.tensor_names if n.endswith(".lr_u") or n.endswith(".lr_v")]
    assert lr and {f.tensor_type(n) for n in lr} == {case[1]}
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    native = _native.Model(str(path), n_ctx=64, n_threads=2, kv_f32=True, flash_attn=0)
    toks = np.random.default_rng(7).integers(3, TINY_VOCAB, size=48).astype(np.int32)
    toks[0] = 1
    got = native.eval(toks)
    bound = NATIVE_NMSE[case]
    ref = Reference(path)
    e = nmse(got, ref.logits(toks))
    assert e < bound, (case, e)
    # the decode path (one token per graph: x is [n_in, 1]) is held to the same bound
    one = _native.Model(str(path), n_ctx=64, n_threads=2, kv_f32=True, flash_attn=0, n_batch=1)
    assert nmse(one.eval(toks[:20]), ref.logits(toks[:20])) < bound
    long = np.random.default_rng(8).integers(3, TINY_VOCAB, size=70).astype(np.int32)
    ours, theirs = ref.perplexity(long, n_ctx=32), native.perplexity(long, n_ctx=32)
    assert (ours.n_chunks, ours.count) == (theirs.n_chunks, theirs.count) == (2, 30)
    assert abs(ours.ppl - theirs.ppl) / theirs.ppl < NATIVE_PPL_REL[case], (ours.ppl, theirs.ppl)
    controls = {}
    for wrong in (_ignored, _on_clipped):
        monkeypatch.setattr(ops.Linear, "__call__", wrong)
        controls[wrong.__name__] = nmse(got, Reference(path).logits(toks))
        monkeypatch.setattr(ops.Linear, "__call__", _LINEAR_CALL)
    controls["gain_scaled"] = nmse(got, _gain_scaled(Reference(path), f).logits(toks))
    assert all(c > CONTROL_MARGIN * bound for c in controls.values()), (case, e, controls, bound)


def test_one_dimensional_v_is_rank_1_in_both_readers(runtime_files, tmp_path):
    """ggml has no 1-D / [1, n] distinction (ne[] only), so a 1-D lr_v [n_in] is a rank-1 V for the
    C++ loader; the Python reader must read the same file the same way (FORMAT.md section 10:
    both readers accept exactly the same files)."""
    from gguf_edit import rewrite
    base = runtime_files[("stock", "F16")]
    f0 = LRQModelFile(base)
    drop = {n for n in f0.tensor_names if n.startswith("blk.1.ffn_up.lrq_r0.lr_")}
    rng = np.random.default_rng(5)
    u, v = 0.1 * rng.standard_normal((192, 1)), 0.1 * rng.standard_normal(64)
    F16 = 1
    path = rewrite(base, tmp_path / "v1d.gguf", drop=drop, add={
        "blk.1.ffn_up.lrq_r0.lr_u": (u.astype(np.float16), F16),
        "blk.1.ffn_up.lrq_r0.lr_v": (v.astype(np.float16), F16)})
    rp = LRQModelFile(path).replica_params("blk.1.ffn_up.weight", 0)
    assert rp.lr_u.shape == (192, 1) and rp.lr_v.shape == (1, 64) and rp.rank == 1
    toks = np.random.default_rng(9).integers(3, TINY_VOCAB, size=24).astype(np.int32)
    got = _native.Model(str(path), n_ctx=64, n_threads=2, kv_f32=True, flash_attn=0).eval(toks)
    assert nmse(got, Reference(path).logits(toks)) < NATIVE_NMSE[("stock", "F16")]


def test_lowrank_files_are_accepted_by_every_reader(runtime_files, tmp_path):
    """The readers of tests/test_bad_files.py (lrq-inspect, the reference, the binding, llama-cli)
    all take a file with low-rank factors (the control of that table's low-rank rows)."""
    from test_bad_files import CHAT_TEMPLATE, _binding, _inspect, _reference, _run_tool

    def llama_cli(path):
        # loaded and answered (test_bad_files' check, except that the answer may begin with a space)
        template = tmp_path / "passthrough.jinja"
        template.write_text(CHAT_TEMPLATE)
        rc, out = _run_tool("llama-cli", ["-m", str(path), "-p", "the", "-n", "2", "-st", "--temp", "0", "-t", "1",
                                          "-c", "64", "--jinja", "--chat-template-file", str(template)])
        return rc == 0 and "Error" not in out and "> the\n" in out and "Generation:" in out, out

    for case in (("lrq", "F16"), ("stock", "Q8_0")):
        path = runtime_files[case]
        got = {"lrq-inspect": _inspect(path), "reference": _reference(path), "binding": _binding(path),
               "llama-cli": llama_cli(path)}
        assert all(ok for ok, _ in got.values()), {k: m[-1500:] for k, (ok, m) in got.items() if not ok}


def test_inspect_reports_the_corrections(runtime_files, capsys):
    # counted from gguf-py's tensor list, independently of lrq's reader
    import gguf

    from lrq.cli.inspect import main as inspect_main
    for (base, typ), path in runtime_files.items():
        r = gguf.GGUFReader(str(path))
        v = [t for t in r.tensors if t.name.endswith(".lr_v")]
        ranks = sorted({int(t.shape[-1]) if len(t.shape) == 2 else 1 for t in v})   # ggml order
        assert inspect_main([str(path), "--no-tensors"]) == 0
        out = capsys.readouterr().out
        assert f"low-rank corrections: {len(v)} (linear, replica) pairs, rank {', '.join(map(str, ranks))}" in out
        assert typ in out.split("low-rank corrections:")[1].splitlines()[0]


def test_rank_0_calibration_keeps_and_trains_the_files_factors(src, windows, runtime_files, tmp_path):
    """--lowrank 0 on a file with factors: they stay (same rank, F16), are trained, and what the
    calibrator measured is what the written file does."""
    path = runtime_files[("stock", "F16")]
    out = tmp_path / "cal.gguf"
    s = calibrate(path, out, src, CalibrateOptions(steps=5, progress=False), windows=windows[:2])
    assert calibration_loss(out, src, windows[:2]) == pytest.approx(s.final_loss, rel=LOSS_RTOL)
    f_in, f_out = LRQModelFile(path), LRQModelFile(out)
    names = [n for n in f_in.tensor_names if n.endswith(".lr_u") or n.endswith(".lr_v")]
    assert names and all(f_out.tensor_info(n).shape == f_in.tensor_info(n).shape for n in names)
    assert any(not np.array_equal(f_in.tensor(n), f_out.tensor(n)) for n in names)
