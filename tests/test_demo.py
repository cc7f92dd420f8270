"""The demo's final table (lrq.cli.demo.final_table) on the tiny llama model, checked against
independent paths: the LRQ row's perplexity against the lrq binding's own perplexity of the same
file, its calibration against the reference executor's loss on the file, its schedule against the
plan lrq-select chose, its bpw against a byte count of the GGUF; and the winner line, and the rule
that calibration never reads the evaluation text."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrq import _native
from lrq.calib import calibration_windows
from lrq.calib.calibrate import calibration_loss
from lrq.cli.demo import FinalOptions, final_table, format_final, winner_line
from lrq.constants import is_aux_tensor
from lrq.eval import Row
from lrq.gguf_hparams import numpy_shape, open_reader
from lrq.lrq_file import LRQModelFile
from tiny_models import tiny_vocab_text

CTX = 128
CHUNKS = 2            # 2 x 63 scored tokens: above llama-perplexity's 100-token minimum for KLD
# the binding and llama-perplexity batch windows differently (float sums in another order)
PPL_RTOL = 1e-3
LOSS_RTOL = 1e-3      # calibrator's float32 modules vs the reference executor on the written file


@pytest.fixture(scope="module")
def texts(tiny_models, tmp_path_factory):
    from lrq import assets
    src = tiny_models.gguf("llama")
    d = tmp_path_factory.mktemp("demo-text")
    calib, evalt = d / "calib.txt", d / "eval.txt"
    tiny_vocab_text(src, assets.text("sotu-calib")[:40_000].replace("\n", " "), calib)
    tiny_vocab_text(src, assets.text("botchan")[:40_000].replace("\n", " "), evalt)
    return calib, evalt


@pytest.fixture(scope="module")
def final(tiny_models, texts, tmp_path_factory):
    import lrq.assets
    src = tiny_models.gguf("llama")
    calib, evalt = texts
    work = tmp_path_factory.mktemp("demo-final")
    o = FinalOptions(text=str(evalt), calib_text=str(calib), ctx=CTX, chunks=CHUNKS, threads=2,
                     select_k=1, select_tokens=2 * CTX, window=CTX, calib_tokens=2 * CTX,
                     calib_steps=5, torch_threads=1, imatrix_chunks=4, stock_work=work / "stock",
                     tg=8, reps=1)
    read = []
    orig = lrq.assets.text
    lrq.assets.text = lambda name: (read.append(str(name)), orig(name))[1]
    n = torch.get_num_threads()
    try:
        res = final_table(src, work / "run", o)
    finally:
        lrq.assets.text = orig
        torch.set_num_threads(n)
    return src, o, res, read


def test_rows_and_calibration_text_only(final, texts):
    src, o, res, read = final
    labels = [r.label for r in res.rows]
    assert labels == ["F32 reference", res.lrq_label, labels[2], "stock Q2_K + imatrix", "stock Q4_0"]
    assert labels[2].endswith("not calibrated")
    assert [r.kind for r in res.rows] == ["reference", "lrq", "lrq", "stock", "stock"]
    # select and calibrate read text only through lrq.assets.text: the calibration text, never
    # the evaluation text (which only llama-perplexity reads, by file name)
    assert read and set(read) == {str(texts[0])}
    ref = res.rows[0]
    assert ref.kld == 0 and ref.top1 == 1.0
    for r in res.rows[1:]:
        assert r.kld > 0 and 0 <= r.top1 <= 1 and math.isfinite(r.ppl)
    for r in res.rows:
        assert r.extra["tg"] > 0


def test_lrq_row_is_the_calibrated_selected_file(final, texts):
    src, o, res, _ = final
    cal, uncal = res.rows[1], res.rows[2]
    f = LRQModelFile(cal.path)
    # the schedule is lrq-select's choice: one layer (k = 1) twice, serial, the others once
    assert len(res.plan) == 1 and list(res.plan.values()) == [2]
    (layer,) = res.plan
    assert f.plan.n_exec == f.hparams.n_layer + 1
    assert f.plan.replicas(layer) == [0, 1]
    assert all(f.plan.replicas(l) == [0] for l in range(f.hparams.n_layer) if l != layer)
    # calibrated: the reference executor on the written files (an independent path) sees the
    # calibrator's loss, and a lower one than before calibration
    win = calibration_windows(src, texts[0], n_tokens=o.calib_tokens, window=o.window)
    after = calibration_loss(cal.path, src, win)
    assert after == pytest.approx(res.calib_loss, rel=LOSS_RTOL)
    assert after < calibration_loss(uncal.path, src, win)
    # the row's PPL is this file's on the evaluation text: the binding's own perplexity
    m = _native.Model(str(cal.path), n_ctx=CTX, n_threads=2)
    ours = m.perplexity(m.tokenize(texts[1].read_text(encoding="utf-8")), n_ctx=CTX, n_chunks=CHUNKS)
    assert ours.ppl == pytest.approx(cal.ppl, rel=PPL_RTOL)
    # whole-file bpw from the bytes: every tensor's data / every base (non-parameter) element
    rd = open_reader(cal.path)
    nbytes = sum(int(t.n_bytes) for t in rd.tensors)
    n = sum(int(np.prod(numpy_shape(t))) for t in rd.tensors if not is_aux_tensor(t.name))
    assert cal.bpw == pytest.approx(8 * nbytes / n, rel=1e-12)


def test_table_text(final):
    src, o, res, _ = final
    text = format_final(res, o)
    best = min(res.rows[1:], key=lambda r: r.kld)
    assert f"winner: {best.label}" in text
    assert "cost: select" in text and "calibrate" in text
    assert all(r.label[:38] in text for r in res.rows)


def _row(label, kind, bpw, ppl, kld, tg):
    return Row(label, label, kind, "x", bpw, ppl, 0.1, kld, 0.0, 0.5, 0.0, extra={"tg": tg})


def test_winner_line_hand_cases():
    ref = _row("F32 reference", "reference", 32, 30, 0, 50)
    lrq = _row("LRQ", "lrq", 3.9, 60, 0.5, 80)
    q2 = _row("stock Q2_K + imatrix", "stock", 5.1, 39, 0.22, 160)
    q4 = _row("stock Q4_0", "stock", 5.3, 40, 0.27, 150)
    line = winner_line([ref, lrq, q2, q4], "LRQ")
    assert line.startswith("winner: stock Q2_K + imatrix (KLD 0.2200")
    assert "smaller (3.90 bpw against 5.10)" in line and "2.3x higher" in line and "0.50x its speed" in line
    good = _row("LRQ", "lrq", 3.9, 35, 0.1, 80)
    assert winner_line([ref, good, q2, q4], "LRQ").startswith(
        "winner: LRQ — lowest KLD (0.1000) at the fewest bits per weight")


def test_refuses_to_calibrate_on_the_evaluation_text(tiny_models, texts, tmp_path):
    o = FinalOptions(text=str(texts[0]), calib_text=str(texts[0]))
    with pytest.raises(ValueError, match="never calibrate on the text you evaluate on"):
        final_table(tiny_models.gguf("llama"), tmp_path, o)
