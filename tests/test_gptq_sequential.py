"""Sequential GPTQ and the least-squares refit of group parameters (lrq.calib.gptq).

GPTQ at 2 bits made SmolLM2 worse than round-to-nearest when its Hessians came from the
full-precision model's stream: the quantized model's inputs drift far from the float ones, and
GPTQ had put its error on the input directions the float stream leaves silent.  Here:

- the mechanism on a synthetic linear (a float stream with silent channels, a quantized stream
  that fills them): float Hessians lose to round-to-nearest on held-out quantized-stream inputs,
  Hessians of the quantized stream win;
- lrq-convert --gptq takes its statistics from the quantized stream by default: every code of
  the file is GPTQ on the inputs the file's own model feeds the linear (the reference executor
  on the written file), not on the source's;
- on the tiny models, the default GPTQ beats round-to-nearest on every linear, measured on
  held-out text through each file's own stream, and the float-stream variant is worse;
- the weighted least-squares refit against an independent solver (numpy lstsq), that it
  lowers the error it minimises, and that inside GPTQ it lowers GPTQ's own objective by more
  than a refit that does not hand the group's changed errors on to the later columns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrq.calib import calibration_windows
from lrq.calib.activations import LINEARS, STAGES, QuantizedStream, SourceActivations
from lrq.calib.gptq import (gptq_quantize_codes, output_error, refit_codes, refit_params,
                            weighted_error, weighted_quantize_codes)
from lrq.cli import convert as convert_cli
from lrq.convert import ConvertOptions, convert
from lrq.lrq_file import LRQModelFile
from lrq.model_file import open_model
from lrq.quant import dequantize_codes, quantize_codes
from tiny_models import tiny_vocab_text

N_WIN, WINDOW = 4, 128          # 512 calibration tokens, as in tests/test_calib.py
BITS, GROUP = 2, 32


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _text(src, piece: str, path):
    # '%' makes the tiny vocabulary's tokenizer fail with an IndexError that tiny_vocab_text does
    # not treat as "character not in the vocabulary": drop it (and non-ASCII) beforehand
    return tiny_vocab_text(src, "".join(c for c in piece.replace("\n", " ")
                                        if c.isascii() and c != "%"), path)


@pytest.fixture(scope="module")
def texts(tiny_models, tmp_path_factory):
    """(calibration text, held-out text): disjoint pieces of sotu-calib."""
    from lrq import assets
    d = tmp_path_factory.mktemp("gptq-texts")
    src = tiny_models.gguf("llama")              # the three tiny models share one vocabulary
    s = assets.text("sotu-calib")
    return _text(src, s[:20_000], d / "calib.txt"), _text(src, s[20_000:40_000], d / "held.txt")


def _cal(text) -> dict:
    return dict(calib_text=str(text), calib_tokens=N_WIN * WINDOW, calib_window=WINDOW)


def _rel_errors(src, model, windows) -> dict:
    """{(layer, linear): ||X (W - W^)^T||^2 / ||X W^T||^2} with X the linear's inputs while
    ``model`` runs (its own residual stream), W the source's weight, W^ the model's."""
    sm = open_model(src)
    acts = SourceActivations(model, windows)
    out = {}
    for L in range(acts.n_layer):
        st = acts.linear_stats(L)
        for name in LINEARS:
            w = sm.tensor(f"blk.{L}.{name}.weight").astype(np.float64)
            w_hat = acts.block(L).lin[name].weight.to(torch.float64).numpy()
            out[(L, name)] = (output_error(w, w_hat, st[name].xtx)
                              / output_error(w, np.zeros_like(w), st[name].xtx))
    return out


# ---- the mechanism, on one synthetic linear -------------------------------------------------

N_OUT, N_IN, N_TOK = 64, 128, 1024
# the quantized stream's drift, relative to the float stream's loud channels: 1.0 puts ~0.47 of
# their energy into the channels the float stream leaves at ~0.002 (SmolLM2's E[x^2] varies
# 40-2400x across input channels)
DRIFT = 1.0
# measured (2 seeds, minmax and mse scales): GPTQ on the quantized stream's Hessian 0.34-0.40 of
# round-to-nearest's held-out error, on the float stream's 1.47-1.70.  An implementation whose
# error feedback ignores H (plain rounding) sits at 1.0, one fed the float Hessian above 1.4.
SYNTH_QUANT_MAX = 0.6
SYNTH_FLOAT_MIN = 1.2


def _streams(rng):
    def corr():      # correlated channels: a random basis with a decaying spectrum
        q, _ = np.linalg.qr(rng.standard_normal((N_IN, N_IN)))
        return (q * (1.0 / (1 + np.arange(N_IN)) ** 0.7)) @ q.T * 4
    c_f, c_d = corr(), corr()
    s = np.where(np.arange(N_IN) % 2 == 0, 1.0, 0.05)   # half the channels nearly silent in float

    def float_x(n):
        return (rng.standard_normal((n, N_IN)) @ c_f) * s

    def quant_x(n):
        return float_x(n) + DRIFT * rng.standard_normal((n, N_IN)) @ c_d
    return float_x, quant_x


@pytest.mark.parametrize("seed,search", [(0, "minmax"), (1, "mse")])
def test_float_hessians_lose_on_the_quantized_stream(seed, search):
    rng = np.random.default_rng(seed)
    float_x, quant_x = _streams(rng)
    w = rng.standard_normal((N_OUT, N_IN)).astype(np.float32)
    gram = lambda x: x.T @ x                                                 # noqa: E731
    h_float, h_quant, h_held = gram(float_x(N_TOK)), gram(quant_x(N_TOK)), gram(quant_x(4 * N_TOK))
    rtn = output_error(w, dequantize_codes(*quantize_codes(w, BITS, GROUP, "asym", scale_search=search),
                                           BITS, GROUP, "asym"), h_held)

    def held(h):
        q, d, m = gptq_quantize_codes(w, h, BITS, GROUP, "asym", scale_search=search)
        return output_error(w, dequantize_codes(q, d, m, BITS, GROUP, "asym"), h_held) / rtn
    assert held(h_quant) < SYNTH_QUANT_MAX
    assert held(h_float) > SYNTH_FLOAT_MIN


# ---- lrq-convert --gptq: statistics of the quantized stream ---------------------------------

# every code of the default conversion is GPTQ on the quantized stream's statistics (measured:
# all of them, the statistics agree bit for bit); GPTQ on the float stream's statistics leaves
# 75-84 % of the codes of layers >= 1 (and of layer 0 after q/k/v) as they are
SEQ_MATCH_MIN = 0.999
FLOAT_MATCH_MAX = 0.95
# QuantizedStream against SourceActivations of the written file: the same float32 block math,
# the same weights; a stage fed the float stream's input differs by O(1)
STATS_RTOL = 1e-4


@pytest.mark.parametrize("tiny_gguf", ["llama", "qwen2", "qwen3"], indirect=True)
def test_convert_uses_the_quantized_stream(tiny_gguf, texts, tmp_path):
    src = tiny_gguf
    out = tmp_path / "gptq.gguf"
    opts = ConvertOptions(bits=BITS, group_size=GROUP, gptq=True, progress=False, **_cal(texts[0]))
    convert(src, out, opts)
    f, sm = LRQModelFile(out), open_model(src)
    windows = calibration_windows(src, texts[0], N_WIN * WINDOW, WINDOW)

    # the stream, its layers replaced by the file's, records what each linear saw
    seen: dict = {}
    qs = QuantizedStream(src, windows)
    order = []
    for L in range(qs.n_layer):
        def fn(name, st, L=L):
            seen[(L, name)] = st
            order.append(name)
            return f.tensor(f"blk.{L}.{name}.weight")
        qs.quantize_layer(fn)
    assert order == [n for stage in STAGES for n in stage] * qs.n_layer

    # independent: the reference executor running the written file records its linears' inputs
    file_acts, float_acts = SourceActivations(out, windows), SourceActivations(src, windows)
    for L in range(qs.n_layer):
        st_file, st_float = file_acts.linear_stats(L), float_acts.linear_stats(L)
        for name in LINEARS:
            xtx = seen[(L, name)].xtx
            np.testing.assert_allclose(xtx, st_file[name].xtx, rtol=STATS_RTOL,
                                       atol=STATS_RTOL * np.abs(xtx).max())
            w = sm.tensor(f"blk.{L}.{name}.weight").astype(np.float32)
            want = f.tensor(f"blk.{L}.{name}.weight")

            def match(st):
                q, d, m = gptq_quantize_codes(w, st.xtx, BITS, GROUP, "asym",
                                              scale_search=opts.scale_search, importance=st.sq_mean,
                                              damp=opts.gptq_damp, refit=opts.refits)
                return float(np.mean(dequantize_codes(q, d, m, BITS, GROUP, "asym") == want))
            assert match(seen[(L, name)]) >= SEQ_MATCH_MIN, (L, name)
            if L > 0 or name not in STAGES[0]:        # layer 0's q/k/v read the same input
                assert match(st_float[name]) <= FLOAT_MATCH_MAX, (L, name)


# ---- held-out error on the tiny models ------------------------------------------------------

# Default GPTQ (quantized stream, MSE scales, refit, damping 0.1) against round-to-nearest
# (minmax, the default without --gptq), per linear, on held-out text through each file's own
# stream.  Measured (2-bit asym g32, 512 calibration tokens), held-out error / RTN's over the
# 21 linears, max / mean:
#   default                                     llama 0.59 / 0.42, qwen2 0.40 / 0.30, qwen3 0.51 / 0.39
#   the same from the float stream              llama 0.60 / 0.44, qwen2 0.43 / 0.33, qwen3 0.54 / 0.42
#   old (float stream, minmax, damping 0.01, no refit)
#                                               llama 1.37 / 0.88, qwen2 1.22 / 0.75, qwen3 1.22 / 0.84
#                                               (loses to RTN on 4, 2 and 6 linears)
# so the old path fails all three bounds below.  Three random layers drift little from the float
# stream, so the stream alone costs only 6-9 % here (SmolLM2's 30 trained layers: KLD 7.1 from
# the float stream against 4.3 from the quantized one, both without refit; the synthetic test
# above shows the mechanism in full).
HELD_RATIO_MAX = 0.75
# the old path's mean over the default's: measured 2.09, 2.51, 2.15
OLD_OVER_DEFAULT_MIN = 1.5
# the float stream's mean over the default's: measured 1.057, 1.094, 1.069
FLOAT_OVER_DEFAULT_MIN = 1.03


@pytest.mark.parametrize("tiny_gguf", ["llama", "qwen2", "qwen3"], indirect=True)
def test_gptq_beats_rtn_on_held_out_text(tiny_gguf, texts, tmp_path):
    src = tiny_gguf
    held = calibration_windows(src, texts[1], N_WIN * WINDOW, WINDOW)
    files = {}
    for tag, kw in (("rtn", {}), ("gptq", dict(gptq=True, **_cal(texts[0]))),
                    ("float", dict(gptq=True, calib_stream="float", **_cal(texts[0]))),
                    ("old", dict(gptq=True, calib_stream="float", refit=False, gptq_damp=0.01,
                                 scale_search="minmax", **_cal(texts[0])))):
        files[tag] = tmp_path / f"{tag}.gguf"
        convert(src, files[tag], ConvertOptions(bits=BITS, group_size=GROUP, progress=False, **kw))
    err = {tag: _rel_errors(src, p, held) for tag, p in files.items()}
    ratio = {tag: {k: err[tag][k] / err["rtn"][k] for k in err["rtn"]} for tag in files if tag != "rtn"}
    mean = {tag: float(np.mean(list(r.values()))) for tag, r in ratio.items()}
    worst = max(ratio["gptq"], key=ratio["gptq"].get)
    assert ratio["gptq"][worst] < HELD_RATIO_MAX, (worst, ratio["gptq"][worst])
    assert mean["old"] > OLD_OVER_DEFAULT_MIN * mean["gptq"], mean
    assert mean["float"] > FLOAT_OVER_DEFAULT_MIN * mean["gptq"], mean


# ---- the least-squares refit ----------------------------------------------------------------

# fp16 rounding of the refitted (d, m): the weighted error may exceed the float64 optimum by
# ~2^-11 relative in each parameter (measured: at most 2e-5 above it); a fit without the
# weights misses it by up to 24-53 % on some of these groups, the unrefitted parameters by
# 120-170 %
REFIT_OPT_RTOL = 1e-3


@pytest.mark.parametrize("mode", ["asym", "sym", "ternary"])
def test_refit_params_is_the_weighted_least_squares_fit(mode):
    rng = np.random.default_rng(3)
    bits = 2
    n, L = 200, 64
    x = (rng.standard_normal((n, L)) * rng.uniform(0.5, 2, (n, 1))).astype(np.float32)
    imp = rng.uniform(0, 1, L) ** 4 * 100                       # importance spread over 1e4
    q, d, m = quantize_codes(x, bits, L, mode)
    nd, nm = refit_params(x, q, d[:, 0], None if m is None else m[:, 0], imp, bits, mode)
    z = {"asym": 0.0, "sym": 1.5, "ternary": 1.0}[mode]
    lv = q.astype(np.float64) - z

    def werr(dd, mm):
        deq = dd[:, None] * lv + (0 if mm is None else mm[:, None])
        return (imp * (x - deq) ** 2).sum(1)
    opt = np.empty(n)
    sw = np.sqrt(imp)
    for i in range(n):       # independent solver: weighted least squares through lstsq
        a = np.stack([lv[i], np.ones(L)], 1) if mode == "asym" else lv[i][:, None]
        sol = np.linalg.lstsq(a * sw[:, None], x[i] * sw, rcond=None)[0]
        opt[i] = (imp * (x[i] - a @ sol) ** 2).sum()
    new = werr(nd.astype(np.float64), None if nm is None else nm.astype(np.float64))
    old = werr(d[:, 0].astype(np.float64), None if m is None else m[:, 0].astype(np.float64))
    assert (new <= old).all()
    np.testing.assert_array_less(new, opt * (1 + REFIT_OPT_RTOL) + 1e-12)


def _tiny_llama_linears(tiny_models, texts):
    """(layer, linear name, float32 weight, the layer's source statistics) of the tiny llama."""
    src = tiny_models.gguf("llama")
    acts = SourceActivations(src, calibration_windows(src, texts[0], N_WIN * WINDOW, WINDOW))
    sm = open_model(src)
    for L in range(acts.n_layer):
        st = acts.linear_stats(L)
        for name in LINEARS:
            yield L, name, sm.tensor(f"blk.{L}.{name}.weight").astype(np.float32), st


# round-to-nearest with refit on the tiny llama's statistics: measured 0.917 of the
# importance-weighted error without it (2-bit asym g32, deterministic); no refit gives 1.0
REFIT_RTN_TOTAL_MAX = 0.95


def test_refit_lowers_the_weighted_error(tiny_models, texts):
    tot = {False: 0.0, True: 0.0}
    for L, name, w, st in _tiny_llama_linears(tiny_models, texts):
        e = {}
        for refit in (False, True):
            q, d, m = weighted_quantize_codes(w, BITS, GROUP, "asym", st[name].sq_mean, refit=refit)
            e[refit] = weighted_error(w, dequantize_codes(q, d, m, BITS, GROUP, "asym"), st[name].sq_mean)
            tot[refit] += e[refit]
        assert e[True] <= e[False], (L, name)
        # uniform importance: the plain squared error of round-to-nearest
        q, d, m = quantize_codes(w, BITS, GROUP, "asym", scale_search="mse")
        q2, d2, m2 = refit_codes(w, q, d, m, BITS, GROUP, "asym")
        assert (np.square(dequantize_codes(q2, d2, m2, BITS, GROUP, "asym") - w).sum()
                <= np.square(dequantize_codes(q, d, m, BITS, GROUP, "asym") - w).sum())
    assert tot[True] / tot[False] < REFIT_RTN_TOTAL_MAX


# GPTQ with refit against GPTQ without, on GPTQ's own objective (the output error under the
# dampened Hessian the codes were chosen with), summed over the tiny llama's linears: measured
# 0.819 (qwen2: 0.815); refitting without handing the group's changed errors on to the later
# columns measured 0.879 (0.888), no refit 1.0
GPTQ_REFIT_RATIO_MAX = 0.85
GPTQ_TEST_DAMP = 0.1


def test_gptq_refit_feeds_its_errors_forward(tiny_models, texts):
    tot = {False: 0.0, True: 0.0}
    for L, name, w, st in _tiny_llama_linears(tiny_models, texts):
        h = st[name].xtx
        h_damped = h + GPTQ_TEST_DAMP * np.mean(np.diag(h)) * np.eye(len(h))
        for refit in (False, True):
            q, d, m = gptq_quantize_codes(w, h, BITS, GROUP, "asym", damp=GPTQ_TEST_DAMP, refit=refit)
            tot[refit] += output_error(w, dequantize_codes(q, d, m, BITS, GROUP, "asym"), h_damped)
    assert tot[True] / tot[False] < GPTQ_REFIT_RATIO_MAX


# ---- options ---------------------------------------------------------------------------------

def test_stream_and_refit_options(tiny_models, texts, tmp_path, capsys):
    src = tiny_models.gguf("llama")
    cal = ["--calib-text", str(texts[0]), "--calib-tokens", str(N_WIN * WINDOW),
           "--calib-window", str(WINDOW)]
    outs = {}
    for tag, extra in (("seq", []), ("float", ["--calib-stream", "float"])):
        outs[tag] = tmp_path / f"{tag}.gguf"
        rc = convert_cli.main([str(src), str(outs[tag]), "--gptq", "-q", *cal, *extra])
        assert rc == 0, capsys.readouterr().err
    a, b = LRQModelFile(outs["seq"]), LRQModelFile(outs["float"])
    # layer 0's q/k/v see the same input in both streams; attn_output onwards does not
    assert np.array_equal(a.tensor("blk.0.attn_q.weight"), b.tensor("blk.0.attn_q.weight"))
    assert not np.array_equal(a.tensor("blk.1.attn_q.weight"), b.tensor("blk.1.attn_q.weight"))
    rc = convert_cli.main([str(src), str(tmp_path / "x.gguf"), "--base-type", "Q2_K", "--refit", "-q"])
    assert rc != 0 and "--refit" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(SystemExit):
        convert_cli.main([str(src), str(tmp_path / "x.gguf"), "--gptq", "--calib-stream", "fp", *cal])
    assert "--calib-stream" in capsys.readouterr().err
