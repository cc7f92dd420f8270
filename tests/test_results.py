"""bench/results.py (`make results`): the generated block replaces only itself in RESULTS.md, the
matrix is well formed, and a --quick run on the tiny llama model writes rows whose figures match
independent paths (the binding's perplexity of the same file, a byte count of its bpw)."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from lrq import _native
from lrq.constants import is_block_linear
from lrq.gguf_hparams import numpy_shape, open_reader
from tiny_models import tiny_vocab_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("bench_results", REPO / "bench" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod         # dataclasses look their module up while executing it
    spec.loader.exec_module(mod)
    return mod


def test_write_doc_replaces_only_the_models_of_the_run(results, tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# title\n\nbefore\n")

    def section(model, text):
        b, e = results._marks(model)
        return {model: f"{b}\n{text}\n{e}"}

    results.write_doc(doc, section("model-a", "first A"))
    s = doc.read_text()
    assert s.startswith("# title\n\nbefore\n") and results.SECTION in s and s.count(results.BEGIN) == 1
    doc.write_text(s + "\n## after\n\nkept\n")
    results.write_doc(doc, section("model-b", "first B"))          # a run for another model: A stays
    results.write_doc(doc, section("model-a", "second A"))         # A again: replaced, B stays
    s2 = doc.read_text()
    assert "first A" not in s2 and "second A" in s2 and "first B" in s2
    assert s2.index("second A") < s2.index("first B")             # a replaced section keeps its place
    assert s2.endswith("## after\n\nkept\n") and s2.startswith("# title\n\nbefore\n")
    assert s2.count(results.SECTION) == 1 and s2.count(results.BEGIN) == 1 and s2.count(results.END) == 1


def test_write_csv_keeps_other_models_rows(results, tmp_path):
    path = tmp_path / "results.csv"
    args = type("A", (), {"texts": ["t"]})()

    def res(model, label):
        return results.Result(model, label, "stock", None)

    results.write_csv(path, {"a": [res("a", "x1")], "b": [res("b", "y1")]}, args)
    results.write_csv(path, {"a": [res("a", "x2"), res("a", "x3")]}, args)
    rows = list(csv.DictReader(open(path)))
    assert sorted((r["model"], r["label"]) for r in rows) == [("a", "x2"), ("a", "x3"), ("b", "y1")]


def test_matrix_is_well_formed(results):
    names = [c.recipe.name for c in results.MATRIX]
    assert len(names) == len(set(names))
    slugs = [c.recipe.slug for c in results.MATRIX]
    assert len(slugs) == len(set(slugs))            # one file per recipe
    assert any(c.quick for c in results.MATRIX)
    for c in results.MATRIX:
        assert not (c.not_on and not c.why), c      # a model restriction says why


def test_gptq_rows_are_what_lrq_convert_gptq_makes(results, tmp_path):
    # a recipe that does not name its scale search gets the converter's default for its
    # quantizer; the control is the earlier defect, GPTQ rows built with minmax scales
    from lrq.cli.convert import build_parser
    from lrq.eval.recipe import Builder, BuildSettings
    cli = build_parser().parse_args(["src.gguf", "out.gguf", "--gptq", "--calib-text", "sotu-calib"])
    b = Builder(tmp_path / "src.gguf", tmp_path, BuildSettings())
    for cell in results.MATRIX:
        r = cell.recipe
        if not r.gptq or dict(r.convert).get("base_type"):
            continue
        o = b.convert_options(r, "none")
        assert o.scale_search == "mse" and cli.scale_search is None, r.name
        assert (o.refits, o.calib_stream) == (True, "quantized"), r.name


def test_quick_run_on_the_tiny_model(results, tiny_models, tmp_path, capsys):
    from lrq import assets
    src = tiny_models.gguf("llama")
    calib = tiny_vocab_text(src, assets.text("sotu-calib")[:40_000].replace("\n", " "), tmp_path / "calib.txt")
    evalt = tiny_vocab_text(src, assets.text("botchan")[:40_000].replace("\n", " "), tmp_path / "eval.txt")
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# results\n")
    rc = results.main(["--models", str(src), "--texts", str(evalt), "--calib-text", str(calib), "--quick",
                       "--ctx", "128", "--chunks", "2", "--calib-tokens", "256", "--calib-steps", "3",
                       "--select-k", "1", "--imatrix-chunks", "4", "--tg", "8", "--threads", "2",
                       "--work", str(tmp_path / "w"), "--stock-work", str(tmp_path / "s"),
                       "--doc", str(doc), "--out-dir", str(tmp_path / "out"), "-q"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rows = {r["label"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    quick = [c.recipe.name for c in results.MATRIX if c.quick and not c.skip]
    stock = [s.label for s in results.STOCK]
    assert set(rows) == {"F32 reference", *stock, *quick}
    assert float(rows["F32 reference"]["kld"]) == 0
    for label in quick + stock:
        r = rows[label]
        assert not r["error"], (label, r["error"])
        assert float(r["kld"]) > 0 and math.isfinite(float(r["ppl"])) and float(r["tg"]) > 0
    # the calibrated selected row is that file's: the binding's perplexity of it on the text
    cal = rows["MSE + sel + cal"]
    (path,) = (tmp_path / "w").rglob(cal["file"])
    assert path.name.endswith(".cal.lrq.gguf")
    m = _native.Model(str(path), n_ctx=128)
    ppl = m.perplexity(m.tokenize(evalt.read_text(encoding="utf-8")), n_ctx=128, n_chunks=2).ppl
    assert ppl == pytest.approx(float(cal["ppl"]), rel=1e-3)
    # bpw of the block linears of the stock Q4_0 file from its bytes; whole file as lrq.eval has it
    q4 = next(Path(p) for p in (tmp_path / "s").glob("*.Q4_0.gguf"))
    rd = open_reader(q4)
    lin = [t for t in rd.tensors if is_block_linear(t.name)]
    want = 8 * sum(int(t.n_bytes) for t in lin) / sum(int(np.prod(numpy_shape(t))) for t in lin)
    assert float(rows["stock Q4_0"]["bpw_lin"]) == pytest.approx(want, rel=1e-5)   # CSV: 6 digits
    whole = 8 * sum(int(t.n_bytes) for t in rd.tensors) / sum(int(np.prod(numpy_shape(t))) for t in rd.tensors)
    assert float(rows["stock Q4_0"]["bpw_file"]) == pytest.approx(whole, rel=1e-5)
    # LRQ: the source-typed embeddings / head weigh more per weight than 2-bit linears
    assert float(rows["MSE + sel + cal"]["bpw_file"]) > float(rows["MSE + sel + cal"]["bpw_lin"]) > 2
    # the block is in the doc, with the skipped cells and their reasons
    s = doc.read_text()
    assert results.BEGIN in s and results.END in s and "MSE + sel + cal" in s
    assert "Skipped cells:" in s and "not part of --quick" in s
    assert (tmp_path / "out" / f"{Path(src).stem}.eval.png").read_bytes()[:4] == b"\x89PNG"
