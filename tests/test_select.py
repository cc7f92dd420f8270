"""lrq-select: the score components against hand computation, the activation-capture hook and
the measured score against independent paths, the strategies, the plan file, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lrq.cli.select import main as select_main
from lrq.model_file import open_model
from lrq.plan import make_plan
from lrq.select import (ActStats, QuantSpec, SelectError, choose, ranking, relative_error, score,
                        select_layers, write_plan)
from lrq.select.measure import CaptureReference, calib_tokens, capture_stats, measured_loss

# float32 capture vs float64 statistics: relative differences ~1e-7
F32_REL = 1e-6


def test_relative_error_hand_case():
    # one row of 32 weights, one group of 32, 2-bit asym: min 0, max 3 -> m = 0, d = 1 exactly
    # (fp16-exact); every weight in {0,1,2,3} is on the grid except w[5] = 0.4 -> code 0
    w = np.array([[float(i % 4) for i in range(32)]])
    w[0, 5] = 0.4
    spec = QuantSpec(bits=2, group_size=32, mode="asym")
    want = 0.4 / math.sqrt(float((w ** 2).sum()))
    assert relative_error([w], spec) == pytest.approx(want, rel=1e-12)
    # pooled over two weights: sqrt(sum err^2 / sum ||W||^2); the second is exactly on the grid
    w2 = np.array([[float(3 - i % 4) for i in range(32)]])
    want2 = 0.4 / math.sqrt(float((w ** 2).sum() + (w2 ** 2).sum()))
    assert relative_error([w, w2], spec) == pytest.approx(want2, rel=1e-12)
    assert relative_error([w2], spec) == 0.0


def test_activation_stats_hand_case():
    s = ActStats()
    s.add(np.array([[1.0, -1.0], [3.0, -3.0]]))
    # mean 0, population std sqrt((1+1+9+9)/4) = sqrt(5), mean|x| = 2
    assert s.sensitivity() == pytest.approx(math.sqrt(5) / 2, rel=1e-15)
    assert s.massive() == 0.0
    m = ActStats()
    m.add(np.ones((999, 1)))
    m.add(np.array([[1e6]]))          # streamed in two pieces
    # mean|x| = (999 + 1e6) / 1000 = 1000.999; threshold 100 x that = 100099.9: only 1e6 exceeds
    assert m.massive() == pytest.approx(1 / 1000, abs=0)
    assert m.massive(factor=2000.0) == 0.0
    with pytest.raises(SelectError, match="no activations"):
        ActStats().sensitivity()


def test_score_formula():
    assert score(0.5, 2.0, 0.01) == pytest.approx(0.5 * 2.0 * (1 + 10 * 0.01), rel=1e-15)
    assert score(0.5, 2.0, 0.0) == 1.0


def test_ranking_and_strategies():
    v = [0.1, 0.5, 0.3, 0.5, 0.2, float("nan")]
    assert ranking(v) == [1, 3, 2, 4, 0, 5]          # ties: lower layer first; NaN last
    assert choose(v, "top-k", k=2) == {1: 2, 3: 2}
    assert choose(v, "top-k", k=3, replicas=3) == {1: 3, 3: 3, 2: 3}
    assert choose(v, "last-n", k=2) == {4: 2, 5: 2}
    assert choose(v, "progressive", k=1) == {1: 3, 3: 2}
    assert choose(v, "progressive") == {1: 3, 3: 3, 2: 2, 4: 2}   # default k = 6 // 3
    assert choose(v, "top-k", k=0) == {}


@pytest.mark.parametrize("args, msg", [
    (("top-k", 7), "outside 0..6"), (("top-k", -1), "outside"), (("progressive", 4), "outside 0..3"),
    (("best", 1), "unknown strategy"), (("top-k", None), "needs --k"),
])
def test_choose_errors(args, msg):
    with pytest.raises(SelectError, match=msg):
        choose([1.0] * 6, *args)
    with pytest.raises(SelectError, match="replicas must be >= 2"):
        choose([1.0] * 6, "top-k", 1, replicas=1)


def test_plan_file_loads_and_converts(tiny_models, tmp_path):
    from lrq.convert import ConvertOptions, convert
    from lrq.lrq_file import LRQModelFile
    plan = write_plan(tmp_path / "p.json", {2: 3, 0: 2}, n_layer=3)
    assert json.loads(plan.read_text()) == {"layers": {"0": {"replicas": 2, "mode": "serial"},
                                                       "2": {"replicas": 3, "mode": "serial"}}}
    p = make_plan(str(plan), 3)
    assert [(e.layer, e.replica) for e in p.executions] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    out = tmp_path / "x.lrq.gguf"
    convert(tiny_models.gguf("llama"), out, ConvertOptions(plan=str(plan), progress=False))
    assert [(e.layer, e.replica) for e in LRQModelFile(out).schedule] == \
        [(e.layer, e.replica) for e in p.executions]
    with pytest.raises(SelectError, match="must end in .json"):
        write_plan(tmp_path / "p.yaml", {0: 2}, 3)
    with pytest.raises(SelectError, match="does not load"):
        write_plan(tmp_path / "bad.json", {5: 2}, 3)       # layer 5 of a 3-layer model
    assert not (tmp_path / "bad.json").exists()


@pytest.fixture(scope="module")
def flat_text(tmp_path_factory):
    """Botchan on one line: the tiny SentencePiece vocab has no newline / byte tokens."""
    from lrq import assets
    p = tmp_path_factory.mktemp("text") / "botchan-flat.txt"
    p.write_text(assets.path("botchan").read_text(encoding="utf-8").replace("\n", " ")[:40_000])
    return p


def test_capture_hook_and_scores(tiny_models, flat_text):
    src = tiny_models.gguf("llama")
    m = open_model(src)
    win = calib_tokens(src, flat_text, 256, 64)
    assert win.shape == (4, 64) and (win[:, 0] == m.bos_id).all()
    ref = CaptureReference(m, torch.float32)
    stats = capture_stats(ref, win[:2])
    assert sorted(stats) == [0, 1, 2]
    # layer 0's input is the token embedding: compute its statistics independently
    emb = m.tensor("token_embd.weight")[win[:2].ravel()]
    assert stats[0].n == emb.size
    assert stats[0].sensitivity() == pytest.approx(emb.std() / np.abs(emb).mean(), rel=F32_REL)
    # every layer's Error is the pooled relative error of its seven linears, recomputed here
    scores = select_layers(src, QuantSpec(2, 64), flat_text, n_tokens=128, ctx=64)
    for s in scores:
        names = [f"blk.{s.layer}.{l}.weight" for l in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                       "ffn_gate", "ffn_up", "ffn_down")]
        assert s.error == pytest.approx(relative_error([m.tensor(n) for n in names], QuantSpec(2, 64)),
                                        rel=1e-12)
        assert s.score == pytest.approx(s.error * s.sensitivity * (1 + 10 * s.massive), rel=1e-15)
        assert math.isnan(s.kl)
    assert scores[0].sensitivity == pytest.approx(stats[0].sensitivity(), rel=F32_REL)


def test_measured_loss_matches_full_forward(tiny_models, flat_text):
    """The fast path (restart at layer k from the captured input) against a full forward of a
    separate reference whose layer-k weights are replaced."""
    src = tiny_models.gguf("llama")
    m = open_model(src)
    win = calib_tokens(src, flat_text, 64, 64)
    spec = QuantSpec(2, 64)
    from lrq.select.measure import quantized_layer
    q = {k: quantized_layer(m, k, spec) for k in range(3)}
    fast = measured_loss(CaptureReference(m, torch.float32), win, q)
    ref = CaptureReference(m, torch.float32)
    lp_ref = torch.log_softmax(ref.forward(win[0]).double(), -1)
    for k in range(3):
        full = CaptureReference(m, torch.float32)
        for name, wq in q[k].items():
            full.blocks[(k, 0)].lin[name.split(".")[2]].weight = torch.from_numpy(wq)
        lp = torch.log_softmax(full.forward(win[0]).double(), -1)
        kl = float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
        tgt = torch.as_tensor(win[0][1:])[:, None]
        dnll = float(-(lp[:-1].gather(1, tgt)).mean() + (lp_ref[:-1].gather(1, tgt)).mean())
        assert fast[k][0] == pytest.approx(kl, rel=1e-4) and kl > 0
        assert fast[k][1] == pytest.approx(dnll, rel=1e-3, abs=1e-6)


def test_cli_end_to_end_and_errors(tiny_models, flat_text, tmp_path, capsys):
    src = str(tiny_models.gguf("llama"))
    out = tmp_path / "plan.json"
    rc = select_main([src, "-o", str(out), "--k", "1", "--text", str(flat_text), "--tokens", "128",
                      "--ctx", "64", "--measure-tokens", "64", "--rank-by", "kl", "--scores",
                      str(tmp_path / "s.json"), "-q"])
    assert rc == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "Score" in table and "KL" in table
    layers = json.loads((tmp_path / "s.json").read_text())["layers"]
    best = max(layers, key=lambda r: r["kl"])["layer"]
    assert json.loads(out.read_text()) == {"layers": {str(best): {"replicas": 2, "mode": "serial"}}}
    assert make_plan(str(out), 3).n_exec == 4
    for argv, code, msg in [
        ([src, "-o", str(out), "--k", "4"], 1, "outside 0..3"),
        ([src, "-o", str(tmp_path / "p.txt"), "--k", "1"], 2, "must end in .json"),
        ([src, "-o", str(out)], 2, "needs --k"),
        ([src, "-o", str(out), "--k", "1", "--rank-by", "kl"], 2, "needs --measure-tokens"),
        ([str(tmp_path / "none.gguf"), "-o", str(out), "--k", "1"], 1, "no such model file"),
        ([src, "-o", str(out), "--k", "1", "--text", str(tmp_path / "none.txt")], 1, "neither a bundled text"),
        ([src, "-o", str(out), "--k", "1", "--text", str(flat_text), "--tokens", "10"], 1, "less than one window"),
    ]:
        assert select_main(argv + ["-q"]) == code, argv
        assert msg in capsys.readouterr().err, argv


@pytest.mark.slow
def test_smollm2_scores(tmp_path):
    from lrq import assets
    torch.set_num_threads(2)
    scores = select_layers(assets.path("smollm2-135m"), QuantSpec(2, 64), "sotu-calib", n_tokens=512, ctx=512)
    assert len(scores) == 30
    assert all(math.isfinite(s.score) and s.score > 0 for s in scores)
    plan = write_plan(tmp_path / "p.json", choose([s.score for s in scores], "top-k", k=4), 30)
    assert make_plan(str(plan), 30).n_exec == 34
