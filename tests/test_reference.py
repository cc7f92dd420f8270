"""The torch reference executor against `transformers` (an independent implementation of the
same models), schedules against edited HF models, and llama-perplexity's method by hand."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from lrq.model_file import open_model
from lrq.quant import ReplicaParams
from lrq.reference import Reference, ReferenceError, act_clip_quant, perplexity
from tiny_models import ARCHS, TINY_VOCAB, load_tiny_hf
from numerics import nmse

# float64 reference vs float32 transformers on the same F32 weights: the only difference is
# HF's float32 rounding (unit roundoff 6e-8, a few hundred accumulated ops per logit -> relative
# error ~1e-6, NMSE ~1e-12; measured 6e-13..8e-13).  Any modelling error (rope pairing, a
# missing norm or bias, wrong GQA mapping) gives NMSE > 1e-3 (see the sensitivity test).
HF_NMSE = 1e-10
# float32 reference vs float64 reference: float32 rounding only (measured ~7e-13).
F32_NMSE = 1e-10
# incremental decoding vs one pass, both float64: identical math, only blocking of sums
# differs (measured ~1e-30).
INCREMENTAL_NMSE = 1e-20
# x + 0.3 (B - x) + 0.7 (B - x) vs B in float64: a few roundings of the residual stream
# (relative 1e-16, NMSE ~1e-30 after the remaining layers).
PARALLEL_SAME_NMSE = 1e-20
# a deliberately wrong model must be at least this far off, or the bounds above prove nothing
WRONG_MODEL_MIN_NMSE = 1e-3

N_TOKENS = 48


def _tokens(n=N_TOKENS, seed=0):
    t = np.random.default_rng(seed).integers(3, TINY_VOCAB, size=n)
    t[0] = 1   # BOS, as llama.cpp would prepend
    return t


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)[None], use_cache=False).logits[0].double().numpy()


@pytest.fixture(scope="module")
def refs(tiny_models):
    """(float64 Reference, HF model) per arch, built once."""
    out = {}
    def get(arch):
        if arch not in out:
            out[arch] = (Reference(open_model(tiny_models.gguf(arch))), load_tiny_hf(tiny_models.hf(arch)))
        return out[arch]
    return get


# ---- the plain model against transformers -------------------------------------------------

def test_logits_match_transformers(refs, tiny_arch):
    ref, hf = refs(tiny_arch)
    toks = _tokens()
    ours = ref.logits(toks)
    assert ours.shape == (N_TOKENS, TINY_VOCAB) and ours.dtype == np.float64
    assert ours.std() > 0.3     # the random model is not trivially flat
    assert nmse(ours, hf_logits(hf, toks)) < HF_NMSE


def test_float32_close_to_float64(refs, tiny_arch, tiny_models):
    ref64, _ = refs(tiny_arch)
    ref32 = Reference(open_model(tiny_models.gguf(tiny_arch)), dtype=torch.float32)
    toks = _tokens(seed=1)
    l32 = ref32.logits(toks)
    assert l32.dtype == np.float32
    assert nmse(l32, ref64.logits(toks)) < F32_NMSE


def test_incremental_decoding_matches_one_pass(refs, tiny_arch):
    ref, _ = refs(tiny_arch)
    toks = _tokens(seed=2)
    cache = ref.new_cache()
    parts = [ref.forward(toks[a:b], cache).numpy() for a, b in ((0, 10), (10, 11), (11, N_TOKENS))]
    assert cache.n_past == N_TOKENS
    assert nmse(np.concatenate(parts), ref.logits(toks)) < INCREMENTAL_NMSE


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_wrong_rope_pairing_is_detected(refs, arch):
    """The HF bound can fail: swapping llama.cpp's NORM/NEOX pairing breaks agreement."""
    ref, hf = refs(arch)
    wrong = copy.copy(ref)
    wrong.hp = dataclasses.replace(ref.hp, rope_type="neox" if ref.hp.rope_type == "norm" else "norm")
    toks = _tokens()
    assert nmse(wrong.logits(toks), hf_logits(hf, toks)) > WRONG_MODEL_MIN_NMSE


def test_bad_tokens_raise(refs):
    ref, _ = refs("llama")
    with pytest.raises(ReferenceError, match="token ids must lie in 0..319"):
        ref.logits(np.array([1, TINY_VOCAB]))
    with pytest.raises(ReferenceError, match="no tokens"):
        ref.logits(np.array([], dtype=np.int64))


# ---- schedules and replica parameters, against edited HF models -------------------------

class Overlay:
    """A model file with another schedule and per-(weight, replica) ReplicaParams / weight
    scaling: what an LRQ file would hand the executor, built from a plain tiny model."""

    def __init__(self, base, schedule, params=None, scale=None):
        self.base, self.schedule = base, schedule
        self.params = params or {}
        self.scale = scale or {}

    def __getattr__(self, name):
        return getattr(self.base, name)

    def weight(self, name, replica):
        w, p = self.base.weight(name, replica)
        return w * self.scale.get((name, replica), 1.0), self.params.get((name, replica), p)


def _sched(*steps):
    """steps: (layer, replica) serial, or (layer, [(replica, weight), ...]) parallel."""
    from lrq.plan import Execution
    out, g = [], 0
    for layer, what in steps:
        if isinstance(what, list):
            out += [Execution(layer, r, g, w) for r, w in what]
        else:
            out.append(Execution(layer, what, g, 1.0))
        g += 1
    return out


@pytest.fixture(scope="module")
def llama(tiny_models):
    return open_model(tiny_models.gguf("llama")), tiny_models.hf("llama")


def _hf_with_layers(hf_dir, order):
    """The HF llama running its decoder layers in ``order`` (copies for repeats)."""
    m = load_tiny_hf(hf_dir)
    layers = m.model.layers
    m.model.layers = torch.nn.ModuleList(copy.deepcopy(layers[i]) for i in order)
    m.config.num_hidden_layers = len(order)
    return m


def test_serial_replication_equals_repeated_hf_layer(llama):
    mf, hf_dir = llama
    sched = _sched((0, 0), (1, 0), (1, 1), (1, 2), (2, 0))       # layer 1 three times in a row
    ref = Reference(Overlay(mf, sched))
    toks = _tokens()
    want = hf_logits(_hf_with_layers(hf_dir, [0, 1, 1, 1, 2]), toks)
    assert nmse(ref.logits(toks), want) < HF_NMSE
    # each execution keeps its own KV cache: decoding token by token still agrees
    cache = ref.new_cache()
    inc = np.concatenate([ref.forward(toks[:5], cache).numpy()] +
                         [ref.forward(toks[i:i + 1], cache).numpy() for i in range(5, N_TOKENS)])
    assert nmse(inc, want) < HF_NMSE
    assert sum(k is not None for k in cache.k) == len(sched)


def _identity_replica(layer):
    """Replica 1 of ``layer`` with zero gain on both residual branches: B(x; theta_1) = x."""
    zero = ReplicaParams(gain=np.zeros(64))
    return {(f"blk.{layer}.attn_output.weight", 1): zero, (f"blk.{layer}.ffn_down.weight", 1): zero}


def test_parallel_group_weights(llama):
    """x + sum_j w_j (B_j(x) - x) with B_1 = identity: weights (1, 1) give B_0 (the plain
    model; a mean-of-outputs formula would give B_0 + x), weights (0, 1) skip the layer."""
    mf, hf_dir = llama
    toks = _tokens()
    params = _identity_replica(1)
    full = Reference(Overlay(mf, _sched((0, 0), (1, [(0, 1.0), (1, 1.0)]), (2, 0)), params))
    assert nmse(full.logits(toks), hf_logits(_hf_with_layers(hf_dir, [0, 1, 2]), toks)) < HF_NMSE
    skip = Reference(Overlay(mf, _sched((0, 0), (1, [(0, 0.0), (1, 1.0)]), (2, 0)), params))
    assert nmse(skip.logits(toks), hf_logits(_hf_with_layers(hf_dir, [0, 2]), toks)) < HF_NMSE


def test_parallel_group_of_identical_replicas_is_one_execution(llama):
    mf, _ = llama
    toks = _tokens()
    par = Reference(Overlay(mf, _sched((0, [(0, 0.3), (1, 0.7)]), (1, 0), (2, [(0, 0.5), (2, 0.5)]))))
    assert nmse(par.logits(toks), Reference(mf).logits(toks)) < PARALLEL_SAME_NMSE


def test_replica_gain_bias_and_activation_clip_match_edited_hf(llama):
    """Replica 1 of layer 1: W/2 with gain 2*g on attn_output plus a bias, activations of
    ffn_up clipped to 0.6 max|x| and of attn_q quantized to 4 bits.  HF gets the same edit
    written directly on its modules."""
    mf, hf_dir = llama
    rng = np.random.default_rng(5)
    g = 1.0 + 0.3 * rng.standard_normal(64)
    b = 0.2 * rng.standard_normal(64)
    params = {("blk.1.attn_output.weight", 1): ReplicaParams(gain=2.0 * g, bias=b),
              ("blk.1.ffn_up.weight", 1): ReplicaParams(act_clip=0.6),
              ("blk.1.attn_q.weight", 1): ReplicaParams(act_bits=4)}
    scale = {("blk.1.attn_output.weight", 1): 0.5}
    ref = Reference(Overlay(mf, _sched((0, 0), (1, 1), (2, 0)), params, scale))

    hf = load_tiny_hf(hf_dir)
    layer = hf.model.layers[1]
    o = layer.self_attn.o_proj
    new_o = torch.nn.Linear(o.in_features, o.out_features, bias=True)
    with torch.no_grad():
        new_o.weight.copy_(o.weight * torch.tensor(g, dtype=torch.float32)[:, None])
        new_o.bias.copy_(torch.tensor(b, dtype=torch.float32))
    layer.self_attn.o_proj = new_o

    def clip_06(_mod, args):
        (x,) = args
        a = 0.6 * x.abs().amax(-1, keepdim=True)
        return (torch.clamp(x, -a, a),)

    def quant_4bit(_mod, args):
        (x,) = args
        a = x.abs().amax(-1, keepdim=True)
        s = a / 7.0                                   # 2^(4-1) - 1 levels each side
        return (torch.round(x / s) * s,)

    layer.mlp.up_proj.register_forward_pre_hook(clip_06)
    layer.self_attn.q_proj.register_forward_pre_hook(quant_4bit)
    toks = _tokens()
    want = hf_logits(hf, toks)
    assert nmse(ref.logits(toks), want) < HF_NMSE
    assert nmse(Reference(mf).logits(toks), want) > WRONG_MODEL_MIN_NMSE   # the edit matters


def test_act_clip_quant_by_hand():
    x = torch.tensor([[0.5, 1.5, 2.5, -3.0, -0.5], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # c = 1, k = 3: a = 3, s = 3 / (2^2 - 1) = 1; round half to even: 0.5->0, 1.5->2, 2.5->2
    np.testing.assert_array_equal(act_clip_quant(x, 1.0, 3).numpy(),
                                  [[0, 2, 2, -3, 0], [0, 0, 0, 0, 0]])   # s = 0 row -> 0
    # c = 0.5, no quantization: clamp to +-1.5
    np.testing.assert_array_equal(act_clip_quant(x, 0.5, 0).numpy()[0], [0.5, 1.5, 1.5, -1.5, -0.5])
    # c = 0.5, k = 2: s = 1.5 / 1; xc / s = [1/3, 1, 1, -1, -1/3] -> [0, 1, 1, -1, 0]
    np.testing.assert_array_equal(act_clip_quant(x, 0.5, 2).numpy()[0], [0, 1.5, 1.5, -1.5, 0])
    assert act_clip_quant(x, 1.0, 0) is x
    with pytest.raises(ValueError, match="clip ratio"):
        act_clip_quant(x, 1.5, 0)


@pytest.mark.parametrize("bad, why", [
    ([(0, 0, 0), (1, 0, 1), (1, 0, 1), (2, 0, 2)], "repeats a replica"),
    ([(0, 0, 0), (1, 0, 1), (2, 0, 1)], "mixes layers"),
    ([(0, 0, 0), (2, 0, 1)], r"missing \[1\]"),
    ([(0, 0, 1), (1, 0, 0), (2, 0, 2)], "group ids decrease"),
])
def test_invalid_schedules_are_refused(llama, bad, why):
    from lrq.plan import Execution
    mf, _ = llama
    with pytest.raises(ReferenceError, match=why):
        Reference(Overlay(mf, [Execution(l, r, g, 1.0) for l, r, g in bad]))


# ---- llama-perplexity's method ------------------------------------------------------------

LOG_P = np.log([0.5, 0.25, 0.125, 0.125])     # every position predicts this distribution


def _fixed_model(calls):
    def fn(window):
        calls.append(window.copy())
        return np.tile(LOG_P, (len(window), 1))
    return fn


def test_perplexity_by_hand():
    # n_ctx 8: positions 4, 5, 6 of each window score tokens 5, 6, 7; the 17th token is ignored
    toks = np.array([3, 3, 3, 3, 3, 0, 1, 2,
                     3, 3, 3, 3, 3, 3, 0, 0,
                     2])
    calls = []
    r = perplexity(_fixed_model(calls), toks, n_ctx=8, bos_id=9, add_bos=True)
    # -log2 p of the targets: (1, 2, 3) and (3, 1, 1) bits
    bits = np.array([1, 2, 3, 3, 1, 1], dtype=float)
    assert (r.n_chunks, r.count) == (2, 6)
    assert r.ppl == pytest.approx(2 ** (11 / 6), rel=1e-12)
    assert r.chunk_ppl[0] == pytest.approx(2 ** 2, rel=1e-12)
    nats = bits * math.log(2)
    err = r.ppl * math.sqrt((np.mean(nats ** 2) - np.mean(nats) ** 2) / 5)
    assert r.ppl_err == pytest.approx(err, rel=1e-12)
    # each window from its own start, the first token swapped for BOS; targets are the text's
    assert [list(c) for c in calls] == [[9] + list(toks[1:8]), [9] + list(toks[9:16])]


def test_perplexity_window_options():
    toks = np.arange(40) % 4
    calls = []
    r = perplexity(_fixed_model(calls), toks, n_ctx=8, n_chunks=3, bos_id=9, add_bos=False)
    assert r.n_chunks == 3 and len(calls) == 3
    assert list(calls[1]) == list(toks[8:16])          # no BOS swap
    # an executor returning only positions n_ctx/2.. gives the same figure
    half = perplexity(lambda w: np.tile(LOG_P, (4, 1)), toks, n_ctx=8, n_chunks=3,
                      add_bos=False, logits_from=4)
    assert half.ppl == r.ppl
    with pytest.raises(ValueError, match="at least 16 tokens"):
        perplexity(_fixed_model([]), toks[:15], n_ctx=8, add_bos=False)


def test_reference_perplexity_uses_full_logits_windows(refs):
    """Reference.perplexity (which skips the unscored half) equals the method applied to
    full-window logits."""
    ref, _ = refs("qwen2")
    toks = np.random.default_rng(3).integers(3, TINY_VOCAB, size=70)
    ours = ref.perplexity(toks, n_ctx=32)
    full = perplexity(ref.logits, toks, n_ctx=32, bos_id=1, add_bos=True)
    assert ours.n_chunks == 2 and ours.count == 2 * 15
    assert ours.ppl == pytest.approx(full.ppl, rel=1e-12)
    assert 1 < ours.ppl < 10 * TINY_VOCAB


# ---- the bundled real model -----------------------------------------------------------------

SMOLLM2_N_CTX = 512
SMOLLM2_CHUNKS = 2
# SmolLM2-135M's Q4_1 file scores ~41 on text A with llama-perplexity at 40 chunks (DATA.md:
# Q4_0 40.8, F32 34.0); two windows of the same text land in the same tens.
SMOLLM2_PPL_RANGE = (15.0, 80.0)


@pytest.fixture(scope="module")
def smollm2_tokens():
    """SOTU text A tokenized by transformers' GGUF tokenizer loader (independent of llama.cpp;
    it produces the same ids as llama.cpp's tokenizer on this text)."""
    from transformers import AutoTokenizer
    from lrq import assets
    p = assets.path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    text = assets.path("sotu-eval").read_text(encoding="utf-8")[:20_000]
    return np.array(tok(text)["input_ids"], dtype=np.int64)


@pytest.mark.slow
def test_smollm2_float32_logits_and_perplexity(smollm2_tokens):
    from lrq import assets
    torch.set_num_threads(2)
    ref = Reference(open_model(assets.path("smollm2-135m")), dtype=torch.float32)
    logits = ref.logits(smollm2_tokens[:300])
    assert logits.shape == (300, 49152) and np.isfinite(logits).all()
    # the model predicts the text: its top choice is right far more often than chance
    top1 = (logits[:-1].argmax(1) == smollm2_tokens[1:300]).mean()
    assert top1 > 0.25
    r = ref.perplexity(smollm2_tokens, n_ctx=SMOLLM2_N_CTX, n_chunks=SMOLLM2_CHUNKS)
    assert r.n_chunks == SMOLLM2_CHUNKS and r.count == SMOLLM2_CHUNKS * 255
    assert SMOLLM2_PPL_RANGE[0] < r.ppl < SMOLLM2_PPL_RANGE[1], r.ppl
