"""Mixture-of-experts architectures (qwen2moe, qwen3moe, llama with experts = Mixtral;
docs/moe.md) on tiny random models.

The float64 reference executor against `transformers` (an independent implementation of the
routing, the experts and qwen2moe's shared expert); the converter's tensor types (router and
norms never quantized, stacked experts in their source or a stock type); the patched runtime
(`_native`, ggml_mul_mat_id on the experts) against the reference for plans none / serial /
parallel on LRQ files, on a stock-typed (llama-quantize) base, and for a load-time layer map on
the plain GGUF; refusals of replica tensors on experts, by both readers.

Routing is a discontinuous function: a token whose k-th and (k+1)-th router logits are closer
than the runtime's rounding may pick another expert there than the reference does, and its
logits (and those of every later token, through the KV cache) then differ by the order of the
model itself.  Tests that compare the runtime with the reference therefore run on token
sequences whose smallest routing margin, in every execution of the reference, is above a named
bound; the sequence is chosen by seed from a fixed list, deterministically.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lrq.convert import ConvertOptions, convert
from lrq.convert.update import set_replica_params
from lrq.model_file import open_model
from lrq.reference import Reference, moe as ref_moe
from numerics import nmse
from tiny_models import TINY_VOCAB
from tiny_moe import (MOE_ARCHS, N_EXPERT, N_EXPERT_USED, convert_moe_hf_dir, load_tiny_moe_hf,
                      make_tiny_moe_hf)

from lrq import _native  # built by `make build`; a missing build must fail, not skip

THREADS = 2

# float64 reference vs float32 transformers on the same F32 weights: float32 rounding only
# (measured 3.5e-13 / 3.8e-13 / 5.9e-13 for qwen2moe / qwen3moe / Mixtral).  A wrong routing
# rule (the other top-k renormalisation, the shared expert or its gate dropped) is > 1e-3
# (test_wrong_routing_is_detected).
HF_NMSE = 1e-10
WRONG_MODEL_MIN_NMSE = 1e-3
# Runtime with the spec-exact LRQ op (LRQ_CPU_REF=1), an F32 KV cache and no flash attention vs
# the float64 reference: float32 rounding only (measured 5.7e-14 .. 2.8e-13 over the three
# architectures, plans and layer maps here; the dense models <= 8e-12, tests/test_runtime.py).
# A wrong expert, weight, schedule step or KV slot is orders above (the controls: > 1e-6).
EXACT_NMSE = 1e-9
# the same configuration on llama-perplexity's method (dense models: <= 4e-6)
EXACT_PPL_REL = 1e-5
# float32 rounding moves a router logit by ~1e-6 of its size (|logit| ~ 3): routing margins
# above this cannot flip in the exact configuration.
EXACT_ROUTE_MARGIN = 1e-4
# Stock Q4_0 base (llama-quantize; ggml multiplies Q4_0 by Q8_0-rounded activations, the
# reference by float ones), F32 KV, on sequences with routing margins > STOCK_ROUTE_MARGIN:
# measured 1.3e-3 (qwen2moe), 2.9e-4 (qwen3moe) and 8.4e-4 (mixtral) on the chosen sequence
# with plan all; over
# twelve 24-token sequences with plan last-1, 2.2e-4 .. 2.2e-3 and 2.3e-4 .. 1.6e-2 (qwen3moe:
# these random models amplify rounding through very sharp attention, like the dense tiny
# qwen3's fast-path bounds in tests/test_runtime.py).  The control (the schedule ignored):
# 1.06, 1.19 and 0.92.  A wrong expert layout, a
# dequantization of the stacked Q4_0 experts that mixes experts, or a schedule error moves the
# NMSE to the control's order (asserted CONTROL_MARGIN times above).
STOCK_Q4_NMSE = {"qwen2moe": 5e-3, "qwen3moe": 3e-2, "mixtral": 5e-3}
# Q8_0 activations move router logits by ~1e-3 (|logit| ~ 3)
STOCK_ROUTE_MARGIN = 5e-3
# every control (the schedule or the quantization ignored) must be this far above its bound
CONTROL_MARGIN = 5.0

N_TOKENS = 32
SEEDS = range(40)

SERIAL_PLAN = "last-1"      # the last layer twice, serial
PARALLEL_PLAN = {"layers": {"0": {"replicas": 2, "mode": "serial"},
                            "2": {"replicas": 2, "mode": "parallel", "weights": [0.3, 0.7]}}}
PLANS = ("none", "serial", "parallel")


class MoEModels:
    """HF dirs, F32 GGUFs and LRQ conversions of the tiny MoE models, each built once."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[tuple, Path] = {}

    def hf(self, arch: str) -> Path:
        key = ("hf", arch)
        if key not in self._cache:
            self._cache[key] = make_tiny_moe_hf(arch, self.root / arch / "hf")
        return self._cache[key]

    def gguf(self, arch: str) -> Path:
        key = ("gguf", arch)
        if key not in self._cache:
            self._cache[key] = convert_moe_hf_dir(self.hf(arch), self.root / arch / "f32.gguf")
        return self._cache[key]

    def lrq(self, arch: str, plan: str, extras: bool = True) -> Path:
        """4-bit asym g32 LRQ codes on the attention linears; replicas on shifted grids, and for
        replica 1 of the first replicated layer a gain, bias and activation clip / quant."""
        key = ("lrq", arch, plan, extras)
        if key not in self._cache:
            spec = {"none": "none", "serial": SERIAL_PLAN}.get(plan)
            if plan == "parallel":
                spec = str(self.root / "parallel-plan.json")
                Path(spec).write_text(json.dumps(PARALLEL_PLAN))
            out = self.root / arch / f"lrq-{plan}{'-x' if extras else ''}.gguf"
            base = out.with_suffix(".base.gguf") if extras else out
            convert(self.gguf(arch), base, ConvertOptions(bits=4, group_size=32, plan=spec, grid_offset=0.5,
                                                          scale_delta=0.1, progress=False))
            if extras:
                set_replica_params(base, out, _replica_extras(base))
            self._cache[key] = out
        return self._cache[key]

    def stock(self, arch: str, plan: str = "all") -> Path:
        """llama-quantize Q4_0 of the F32 GGUF wrapped as an LRQ v2 file (lrq-convert --base-type);
        plan "all": every layer twice, so that ignoring the schedule is far off."""
        key = ("stock", arch, plan)
        if key not in self._cache:
            out = self.root / arch / f"stock-q4_0-{plan}.gguf"
            work = self.root / arch / "work"
            work.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([str(Path(sys.executable).parent / "lrq-convert"),
                                   "-q", "--base-type", "Q4_0", "--work", str(work), "--plan", plan,
                                   str(self.gguf(arch)), str(out)], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            self._cache[key] = out
        return self._cache[key]


def _replica_extras(path: Path) -> dict[str, np.ndarray]:
    f = open_model(path)
    reps = [(e.layer, e.replica) for e in f.schedule if e.replica > 0]
    if not reps:
        return {}
    layer, r = reps[0]
    rng = np.random.default_rng(layer * 10 + r)
    out = {}
    for stem in ("attn_q", "attn_v", "attn_output"):
        n_out = f.tensor_info(f"blk.{layer}.{stem}.weight").shape[0]
        pre = f"blk.{layer}.{stem}.lrq_r{r}."
        out[pre + "gain"] = (1 + 0.1 * rng.standard_normal(n_out)).astype(np.float32)
        out[pre + "bias"] = (0.02 * rng.standard_normal(n_out)).astype(np.float32)
    out[f"blk.{layer}.attn_v.lrq_r{r}.act"] = np.array([0.9, 8], np.float32)
    return out


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> MoEModels:
    return MoEModels(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(params=MOE_ARCHS)
def moe_arch(request) -> str:
    return request.param


# ---- routing margins and token choice ------------------------------------------------------------

def routing_margins(ref: Reference, tokens) -> np.ndarray:
    """Smallest gap between the k-th and (k+1)-th router logit of each token over every
    execution of ``ref`` (float64), [n_tokens]."""
    seen = []
    orig = ref_moe.MoEFFN.route

    def route(self, h):
        top = torch.topk(h @ self.router.T, self.n_used + 1, dim=-1).values
        seen.append((top[:, -2] - top[:, -1]).numpy())
        return orig(self, h)

    ref_moe.MoEFFN.route = route
    try:
        ref.logits(tokens)
    finally:
        ref_moe.MoEFFN.route = orig
    return np.min(np.stack(seen), axis=0)


def tokens_with_margin(ref: Reference, margin: float, n: int = N_TOKENS) -> np.ndarray:
    """The first sequence of SEEDS (BOS + random tokens) whose routing margins all exceed
    ``margin`` in ``ref``."""
    for seed in SEEDS:
        t = np.random.default_rng(seed).integers(3, TINY_VOCAB, size=n).astype(np.int32)
        t[0] = 1
        if routing_margins(ref, t).min() > margin:
            return t
    raise AssertionError(f"no sequence of {n} tokens among seeds {SEEDS} has routing margins > {margin}")


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None],
                     use_cache=False).logits[0].double().numpy()


# ---- the reference against transformers -----------------------------------------------------------

def test_reference_matches_transformers(moe_models, moe_arch):
    ref = Reference(open_model(moe_models.gguf(moe_arch)))
    hf = load_tiny_moe_hf(moe_models.hf(moe_arch))
    toks = np.random.default_rng(0).integers(3, TINY_VOCAB, size=48)
    toks[0] = 1
    ours = ref.logits(toks)
    assert ours.std() > 0.3
    assert nmse(ours, _hf_logits(hf, toks)) < HF_NMSE
    # the routing is not degenerate: every expert serves some token, no token's choice is forced
    moe = ref._moe[0]
    h = torch.as_tensor(np.random.default_rng(1).standard_normal((64, moe.router.shape[1])))
    _, idx = moe.route(h)
    assert idx.shape == (64, N_EXPERT_USED) and len(torch.unique(idx)) == N_EXPERT


def test_wrong_routing_is_detected(moe_models, moe_arch):
    """The HF bound can fail: the other renormalisation rule, and (qwen2moe) no shared expert."""
    ref = Reference(open_model(moe_models.gguf(moe_arch)))
    hf = _hf_logits(load_tiny_moe_hf(moe_models.hf(moe_arch)), toks := np.arange(1, 49))
    wrongs = [{"norm_w": not ref._moe[0].norm_w}]
    if moe_arch == "qwen2moe":
        wrongs.append({"shexp_gate_inp": None})
    for change in wrongs:
        wrong = Reference(open_model(moe_models.gguf(moe_arch)))
        for b in wrong.blocks.values():
            b.moe = dataclasses.replace(b.moe, **change)
        assert nmse(wrong.logits(toks), hf) > WRONG_MODEL_MIN_NMSE, change


# ---- the converter ----------------------------------------------------------------------------------

def _types(path: Path) -> dict[str, str]:
    m = open_model(path)
    return {n: m.tensor_type(n) for n in m.tensor_names}


def test_converter_keeps_router_and_norms_full_precision(moe_models, moe_arch):
    src = _types(moe_models.gguf(moe_arch))
    lrq = _types(moe_models.lrq(moe_arch, "none", extras=False))
    stock = _types(moe_models.stock(moe_arch))
    for L in range(3):
        p = f"blk.{L}."
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
            assert lrq[f"{p}{kind}.weight"] == "LRQ4"
        for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            assert lrq[f"{p}{kind}.weight"] == src[f"{p}{kind}.weight"] == "F32"   # source type kept
            assert stock[f"{p}{kind}.weight"] == "Q4_0"                              # a stock type
    for types in (lrq, stock):
        full = {n: t for n, t in types.items()
                if "ffn_gate_inp" in n or n.endswith("norm.weight")}
        # attn_norm, ffn_norm, ffn_gate_inp + qwen2moe's ffn_gate_inp_shexp / qwen3moe's q and k
        # norms, per layer; + output_norm
        assert len(full) == 3 * {"qwen2moe": 4, "qwen3moe": 5, "mixtral": 3}[moe_arch] + 1
        assert set(full.values()) <= {"F32", "F16"}, full
    # no LRQ parameter tensor of any expert or router: the replicas are attention-only
    assert not any(".lrq_" in n and ("exps" in n or "gate_inp" in n or "shexp" in n) for n in lrq)


# ---- the runtime against the reference --------------------------------------------------------------

@pytest.mark.parametrize("plan", PLANS)
def test_runtime_exact_matches_reference(moe_models, moe_arch, plan, monkeypatch):
    path = moe_models.lrq(moe_arch, plan)
    ref = Reference(open_model(path))
    toks = tokens_with_margin(ref, EXACT_ROUTE_MARGIN)
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    native = _native.Model(str(path), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0)
    assert native.n_layer == len(ref.schedule)
    got = native.eval(toks)
    e = nmse(got, ref.logits(toks))
    assert e < EXACT_NMSE, f"{moe_arch} {plan}: NMSE {e:.3g}"
    # the control: the schedule ignored (plain quantized model), or the quantization (plan none)
    wrong = moe_models.gguf(moe_arch) if plan == "none" else moe_models.lrq(moe_arch, "none", extras=False)
    control = nmse(got, Reference(open_model(wrong)).logits(toks))
    assert control > 1e3 * EXACT_NMSE, control
    # perplexity keeps only the scored rows on the last execution (inp_out_ids): the parallel
    # plan's group on the last layer must follow (two windows of 32, the second half scored)
    long = np.random.default_rng(8).integers(3, TINY_VOCAB, size=70).astype(np.int32)
    ours, theirs = ref.perplexity(long, n_ctx=32), native.perplexity(long, n_ctx=32)
    assert (ours.n_chunks, ours.count) == (theirs.n_chunks, theirs.count) == (2, 30)
    assert abs(ours.ppl - theirs.ppl) / theirs.ppl < EXACT_PPL_REL, (ours.ppl, theirs.ppl)


def test_runtime_stock_base_matches_reference(moe_models, moe_arch):
    path = moe_models.stock(moe_arch)
    ref = Reference(open_model(path))
    toks = tokens_with_margin(ref, STOCK_ROUTE_MARGIN, 24)
    bound = STOCK_Q4_NMSE[moe_arch]
    native = _native.Model(str(path), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0)
    got = native.eval(toks)
    e = nmse(got, ref.logits(toks))
    assert e < bound, f"{moe_arch}: NMSE {e:.3g}"
    control = nmse(got, Reference(open_model(moe_models.stock(moe_arch, "none"))).logits(toks))
    assert control > CONTROL_MARGIN * bound, control


@pytest.mark.parametrize("layers", ["1x2", "0..2,1..2"])
def test_layer_map_on_plain_moe_gguf(moe_models, moe_arch, layers):
    """--lrq-layers on the converter's own F32 GGUF: virtual layers aliasing the router and the
    experts, each execution with its own KV cache, against the reference running the same map."""
    path = moe_models.gguf(moe_arch)
    ref = Reference(open_model(path, layers=layers))
    toks = tokens_with_margin(ref, EXACT_ROUTE_MARGIN)
    native = _native.Model(str(path), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0, layers=layers)
    assert native.n_layer == len(ref.schedule)
    got = native.eval(toks)
    assert nmse(got, ref.logits(toks)) < EXACT_NMSE
    control = nmse(got, Reference(open_model(path)).logits(toks))
    assert control > 1e3 * EXACT_NMSE, control


# ---- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, n", [("blk.2.ffn_up_exps.lrq_r1.gain", 96),
                                     ("blk.2.ffn_gate_inp.lrq_r1.gain", N_EXPERT),
                                     ("blk.2.ffn_gate_inp_shexp.lrq_r1.bias", 1)])
def test_replica_tensor_on_expert_or_router_is_refused(moe_models, tmp_path, name, n):
    """Replicas are per layer (attention linears) until expert-level replication is specified
    (docs/moe.md): a replica parameter of the stacked experts or of the router is refused by
    the Python reader and by libllama, naming the tensor, never an abort."""
    import gguf
    from gguf_edit import rewrite
    from lrq.lrq_file import LRQFileError
    bad = rewrite(moe_models.lrq("qwen2moe", "serial", extras=False), tmp_path / "bad.gguf",
                  add={name: (np.ones(n, np.float32), gguf.GGMLQuantizationType.F32)})
    with pytest.raises(LRQFileError, match=f"{bad}: tensor {name.replace('.', '[.]')} belongs to no LRQ weight"):
        open_model(bad)
    with pytest.raises(_native.LoadError, match=f"{bad}: LRQ: tensor {name.replace('.', '[.]')} is for replica"):
        _native.Model(str(bad), n_ctx=32)


def test_inspect_shows_experts(moe_models, capsys):
    """lrq-inspect's summary line and JSON: expert counts from the file's keys, the stacked
    experts' type (here llama-quantize's Q4_0) and the router's (F32)."""
    from lrq.cli.inspect import main
    assert main(["--no-tensors", str(moe_models.stock("qwen2moe"))]) == 0
    assert ("experts: 8 per layer in 3 MoE layers, 2 used per token; stacked experts Q4_0, router F32, "
            "shared expert Q4_0") in capsys.readouterr().out
    assert main(["--json", str(moe_models.lrq("qwen3moe", "none", extras=False))]) == 0
    x = json.loads(capsys.readouterr().out)["experts"]
    assert x == {"n_expert": N_EXPERT, "n_used": N_EXPERT_USED, "n_moe_layers": 3, "expert_types": ["F32"],
                 "router_types": ["F32"], "shared_expert_types": []}


def test_tools_without_moe_support_refuse_by_name(moe_models, tmp_path, capsys):
    """lrq-calibrate, lrq-distill and lrq-select fit and score the seven dense block linears;
    on a MoE file they refuse before any work, naming the file and docs/moe.md (a traceback
    about a missing ffn_gate tensor was the earlier behaviour)."""
    from lrq.cli.calibrate import main as calibrate
    from lrq.cli.distill import main as distill
    from lrq.cli.select import main as select
    for arch in ("qwen2moe", "mixtral"):
        lrq, src = moe_models.lrq(arch, "serial", extras=False), moe_models.gguf(arch)
        base = {"qwen2moe": "qwen2moe", "mixtral": "llama"}[arch]
        for run in (lambda: calibrate(["-q", "--source", str(src), str(lrq), str(tmp_path / "c.gguf")]),
                    lambda: distill(["-q", "--source", str(src), str(lrq), str(tmp_path / "d.gguf")])):
            assert run() != 0
            err = capsys.readouterr().err
            assert f"{lrq}: '{base}' is a mixture-of-experts model" in err and "docs/moe.md" in err, err
        assert select(["-o", str(tmp_path / "p.json"), "--k", "1", str(src)]) == 1
        err = capsys.readouterr().err
        assert f"{src}: '{base}' is a mixture-of-experts model" in err, err
        assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_activation_aware_conversion_of_moe(moe_models, tmp_path, method, monkeypatch):
    """The converter's calibration capture runs the MoE blocks (router and experts through the
    reference) and fits the attention linears only; the file then runs exactly as the reference
    reads it."""
    from tiny_models import tiny_calib_text
    src = moe_models.gguf("qwen3moe")
    text = tiny_calib_text(src, tmp_path / "calib.txt")
    out = tmp_path / f"{method}.gguf"
    opts = dict(scale_search="act-mse") if method == "awq" else dict(gptq=True)
    convert(src, out, ConvertOptions(bits=3, group_size=32, calib_text=str(text), calib_tokens=512,
                                     progress=False, **opts))
    types = _types(out)
    assert types["blk.1.attn_q.weight"] == "LRQ3" and types["blk.1.ffn_up_exps.weight"] == "F32"
    ref = Reference(open_model(out))
    toks = tokens_with_margin(ref, EXACT_ROUTE_MARGIN)
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    native = _native.Model(str(out), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0)
    assert nmse(native.eval(toks), ref.logits(toks)) < EXACT_NMSE


def test_hf_directory_source_equals_gguf_source(moe_models, tmp_path):
    """lrq-convert on Mixtral's HF directory (MixtralForCausalLM, converted by the pinned
    convert_hf_to_gguf.py inside lrq-convert) writes the tensors it writes from the GGUF."""
    from gguf_edit import read
    a, b = tmp_path / "from-hf.gguf", tmp_path / "from-gguf.gguf"
    convert(moe_models.hf("mixtral"), a, ConvertOptions(bits=2, group_size=32, progress=False))
    convert(moe_models.gguf("mixtral"), b, ConvertOptions(bits=2, group_size=32, progress=False))
    (_, ta), (_, tb) = read(a), read(b)
    assert sorted(ta) == sorted(tb) and any(n.endswith("_exps.weight") for n in ta)
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert np.array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data)), name
