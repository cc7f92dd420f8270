"""lrq-eval: llama-perplexity output parsers (on captured real output), bpw, Pareto front, stock
files, and the whole pipeline (tiny model fast; SmolLM2 2 chunks slow)."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lrq import eval as ev
from lrq.cli.eval import main as eval_main

# Captured with the pinned, patched llama.cpp on SmolLM2-135M (F32 reference = the Q4_1 source
# dequantized), text sotu-eval, -c 512, --chunks 2, -t 2:
#   llama-perplexity -m ref-f32.gguf -f sotu-eval.txt -c 512 --chunks 2 -t 2 --kl-divergence-base base2.kld
BASE_LOG = '0.00.643.345 I cmn          init: llama threadpool init, n_threads = 2\n0.01.153.987 I \n0.01.157.043 I system_info: n_threads = 2 (n_threads_batch = 2) / 2 | LRQ : FORMAT_VERSION = 1 | CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | \n0.01.157.310 I perplexity: saving all logits to base2.kld\n0.01.157.346 I perplexity: tokenizing the input ..\n0.03.109.341 I perplexity: tokenization took 1951.98 ms\n0.03.109.723 I perplexity: calculating perplexity over 2 chunks, n_ctx=512, batch_size=2048, n_seq=4\n0.11.407.226 I perplexity: 8.27 seconds per pass - ETA 0.07 minutes\n[1]28.6101,[2]32.6717,\n0.11.813.324 I Final estimate: PPL = 32.6717 +/- 4.18121\n\n'
#   llama-perplexity -m q4_0.gguf -f sotu-eval.txt -c 512 --chunks 2 -t 2 --kl-divergence-base base2.kld --kl-divergence
KLD_LOG = '0.00.410.721 I cmn          init: llama threadpool init, n_threads = 2\n0.00.738.006 I \n0.00.741.024 I system_info: n_threads = 2 (n_threads_batch = 2) / 2 | LRQ : FORMAT_VERSION = 1 | CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | \n0.00.823.195 I kl_divergence: computing over 2 chunks, n_ctx=512, batch_size=2048, n_seq=4\n0.08.907.661 I kl_divergence: 8.08 seconds per pass - ETA 0.07 minutes\n\nchunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p\n   1      32.0151 ±    5.2378       0.11245 ±    0.04345       0.25781 ±    0.01013     9.377 ±  0.752 %    70.196 ±  2.870 %\n   2      38.4549 ±    4.7338       0.16298 ±    0.03133       0.25298 ±    0.00747    10.004 ±  0.652 %    69.608 ±  2.039 %\n\n====== Perplexity statistics ======\nMean PPL(Q)                   :  38.454892 ±   4.733811\nMean PPL(base)                :  32.671695 ±   4.181205\nCor(ln(PPL(Q)), ln(PPL(base))):  96.96%\nMean ln(PPL(Q)/PPL(base))     :   0.162977 ±   0.031329\nMean PPL(Q)/PPL(base)         :   1.177009 ±   0.036875\nMean PPL(Q)-PPL(base)         :   5.783197 ±   1.228279\n\n====== KL divergence statistics ======\nMean    KLD:   0.252976 ±   0.007474\nMaximum KLD:   1.260886\n99.9%   KLD:   1.116536\n99.0%   KLD:   0.831349\n95.0%   KLD:   0.563299\n90.0%   KLD:   0.456443\nMedian  KLD:   0.221155\n10.0%   KLD:   0.082717\n 5.0%   KLD:   0.046392\n 1.0%   KLD:   0.012082\n 0.1%   KLD:   0.002059\nMinimum KLD:   0.000950\n\n====== Token probability statistics ======\nMean    Δp: -3.322 ± 0.418 %\nMaximum Δp: 40.247%\n99.9%   Δp: 32.055%\n99.0%   Δp: 19.089%\n95.0%   Δp:  7.052%\n90.0%   Δp:  2.384%\n75.0%   Δp:  0.198%\nMedian  Δp: -0.245%\n25.0%   Δp: -5.084%\n10.0%   Δp: -15.186%\n 5.0%   Δp: -23.204%\n 1.0%   Δp: -37.317%\n 0.1%   Δp: -53.505%\nMinimum Δp: -56.845%\nRMS Δp    : 10.004 ± 0.652 %\nSame top p: 69.608 ± 2.039 %\n\n'


def test_parse_base_captured():
    r = ev.parse_base(BASE_LOG)
    assert (r.ppl, r.ppl_err, r.n_chunks, r.n_ctx) == (32.6717, 4.18121, 2, 512)


def test_parse_kld_captured():
    r = ev.parse_kld(KLD_LOG)
    assert (r.ppl, r.ppl_err) == (38.454892, 4.733811)
    assert r.ppl_base == 32.671695
    assert (r.kld, r.kld_err) == (0.252976, 0.007474)
    # printed in percent: "Same top p: 69.608 ± 2.039 %", "RMS Δp    : 10.004 ± 0.652 %"
    assert r.same_top_p == pytest.approx(0.69608, abs=1e-12)
    assert r.same_top_p_err == pytest.approx(0.02039, abs=1e-12)
    assert r.rms_dp == pytest.approx(0.10004, abs=1e-12)
    assert (r.n_chunks, r.n_ctx) == (2, 512)


def test_parse_kld_without_statistics_says_why():
    # the tool prints its statistics only when >= 100 tokens were scored: cut them off
    cut = KLD_LOG.split("====== Perplexity statistics")[0]
    with pytest.raises(ev.ParseError, match="100 tokens"):
        ev.parse_kld(cut)
    with pytest.raises(ev.ParseError, match="Final estimate"):
        ev.parse_base(KLD_LOG)


def test_parse_kld_missing_single_line_is_named():
    broken = "\n".join(l for l in KLD_LOG.splitlines() if not l.startswith("Same top p"))
    with pytest.raises(ev.ParseError, match="Same top p"):
        ev.parse_kld(broken)


def test_pareto_front_hand_case():
    #            0          1          2          3           4          5 (= 1)    6 (NaN)
    pts = [(2.0, 10.0), (3.0, 5.0), (3.5, 6.0), (5.0, 1.0), (2.0, 12.0), (3.0, 5.0), (1.0, math.nan)]
    # 2 is dominated by 1; 4 by 0 (same x, higher y); 1 and 5 are equal: both kept; NaN never
    assert ev.pareto_front(pts) == [0, 1, 5, 3]
    assert ev.pareto_front([]) == []
    assert ev.pareto_front([(1.0, 1.0)]) == [0]


def _row(label, kind, bpw, ppl, kld):
    return ev.Row(label, label, kind, "x", bpw, ppl, 0.0, kld, 0.0, 1.0, 0.0)


def test_mark_pareto_excludes_reference_and_csv(tmp_path):
    rows = [_row("ref", "reference", 32.0, 30.0, 0.0), _row("a", "stock", 5.0, 40.0, 0.3),
            _row("b", "stock", 4.0, 50.0, 0.2), _row("c", "lrq", 4.5, 60.0, 0.5)]
    ev.mark_pareto(rows)
    assert [r.pareto_ppl for r in rows] == [False, True, True, False]
    assert [r.pareto_kld for r in rows] == [False, False, True, False]
    out = ev.write_csv(rows, tmp_path / "r.csv")
    got = list(csv.DictReader(open(out)))
    assert [g["label"] for g in got] == ["ref", "a", "b", "c"]
    assert float(got[2]["kld"]) == 0.2 and got[2]["pareto_kld"] == "True"
    png = ev.plot(rows, tmp_path / "r.png", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_file_bpw_f32_and_lrq(tiny_models, tmp_path):
    from lrq.convert import ConvertOptions, convert
    from lrq.gguf_hparams import numpy_shape, open_reader
    src = tiny_models.gguf("llama")
    b = ev.file_bpw(src)
    assert (b.kind, b.bpw) == ("stock", 32.0)          # every tensor F32: exactly 32 bits
    out = tmp_path / "t.lrq.gguf"
    convert(src, out, ConvertOptions(bits=2, group_size=64, mode="asym", progress=False))
    # hand count: a block linear [n_out, n_in] costs 2 bits a weight + fp16 d and m per 64
    # weights (n_in = 64, 192: whole groups); everything else stays F32
    n_lrq = n_other = 0
    for t in open_reader(src).tensors:
        n = int(np.prod(numpy_shape(t)))
        if t.name.startswith("blk.") and t.name.endswith(("q.weight", "k.weight", "v.weight", "output.weight",
                                                          "gate.weight", "up.weight", "down.weight")):
            n_lrq += n
        else:
            n_other += n
    want = (n_lrq * (2 + 16 / 64 + 16 / 64) + 32 * n_other) / (n_lrq + n_other)
    got = ev.file_bpw(out)
    assert got.kind == "lrq" and got.file_type == "LRQ2 g64"
    assert got.bpw == pytest.approx(want, rel=1e-12)


def test_stock_errors_before_running(tmp_path):
    ref = tmp_path / "r.F32.gguf"
    ref.write_bytes(b"GGUF")
    with pytest.raises(ev.StockError, match="IQ2_XS needs an importance matrix"):
        ev.make_stock(ref, "IQ2_XS", work=tmp_path)
    with pytest.raises(ev.StockError, match="not a llama-quantize type"):
        ev.make_stock(ref, "q4 0", work=tmp_path)
    with pytest.raises(ev.StockError, match="no such reference"):
        ev.make_stock(tmp_path / "missing.gguf", "Q4_0", work=tmp_path)
    with pytest.raises(ev.EvalError, match="neither a bundled text"):
        ev.text_file(tmp_path / "nope.txt")


def test_cli_errors(tmp_path, capsys):
    assert eval_main(["--ref", "smollm2-135m", str(tmp_path / "missing.gguf")]) == 1
    assert "missing.gguf: no such model file" in capsys.readouterr().err
    assert eval_main(["--ref", "smollm2-135m"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert eval_main(["--ref", "botchan", "--stock", "Q4_0", "--work-dir", str(tmp_path)]) == 1
    assert "is a bundled text, not a model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def flat_text(tmp_path_factory):
    """Botchan on one line: the tiny SentencePiece vocab has no newline / byte tokens, and
    llama.cpp's SPM tokenizer throws on an unknown character without byte fallback."""
    from lrq import assets
    p = tmp_path_factory.mktemp("text") / "botchan-flat.txt"
    p.write_text(assets.path("botchan").read_text(encoding="utf-8").replace("\n", " ")[:60_000])
    return p


def test_pipeline_tiny_model(tiny_models, flat_text, tmp_path, capsys):
    """Reference, stock Q4_0 from it, base logits, --kl-divergence, table, CSV, PNG on the tiny
    llama model (vocab 320, -c 128: 2 chunks score 2 x 63 = 126 >= the tool's 100 tokens)."""
    src = tiny_models.gguf("llama")
    lrq_file = tmp_path / "m.gguf"
    shutil.copy(src, lrq_file)
    rc = eval_main(["--ref", str(src), "--stock", "Q4_0", "--text", str(flat_text), "-c", "128",
                    "--chunks", "2", "-t", "2", "--work-dir", str(tmp_path / "w"), "-o",
                    str(tmp_path / "res"), "-q", str(lrq_file)])
    cap = capsys.readouterr()
    assert rc == 0, (cap.out, cap.err)
    out = cap.out
    rows = {r["label"]: r for r in csv.DictReader(open(tmp_path / "res.csv"))}
    assert set(rows) == {"F32 reference", "Q4_0", "m.gguf"}
    q = rows["Q4_0"]
    assert float(q["kld"]) > 0 and math.isfinite(float(q["ppl"]))
    assert 4.5 < float(q["bpw"]) < 32        # Q4_0 blocks are 4.5 bpw; norms stay F32
    # a byte copy of the reference: same logits, so KLD ~ 0 and every top-1 agrees
    same = rows["m.gguf"]
    assert abs(float(same["kld"])) < 1e-5 and float(same["top1"]) == 1.0
    assert float(same["ppl"]) == pytest.approx(float(rows["F32 reference"]["ppl"]), rel=1e-4)
    assert (tmp_path / "res.png").read_bytes()[:4] == b"\x89PNG"
    assert "2 chunks" in out


@pytest.mark.slow
def test_smollm2_q4_0_against_f32(tmp_path):
    rc = eval_main(["--ref", "smollm2-135m", "--stock", "Q4_0", "--chunks", "2", "-t", "2",
                    "--work-dir", str(tmp_path / "w"), "-o", str(tmp_path / "s"), "-q"])
    assert rc == 0
    rows = {r["label"]: r for r in csv.DictReader(open(tmp_path / "s.csv"))}
    assert float(rows["Q4_0"]["kld"]) > 0
    assert math.isfinite(float(rows["Q4_0"]["ppl"])) and math.isfinite(float(rows["F32 reference"]["ppl"]))
    assert float(rows["F32 reference"]["bpw"]) == 32.0
    assert (tmp_path / "s.png").stat().st_size > 0
