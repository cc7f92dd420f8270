"""lrq-eval --ref-type (issue 20 item 2): the reference may be a copy of SRC in F32 / F16 / BF16 /
Q8_0, or SRC itself as it is ("source", no copy at all); every row and the header say which.

On the tiny llama model (vocab 320, -c 128, 2 chunks: 126 scored tokens):
- a file against itself as the ``source`` reference has KLD 0 and top-1 100 %, no copy of it is
  made, and the CSV's ref_type column names it;
- the KLD of one stock Q4_0 file against the F16 copy differs from its KLD against the F32 copy
  by less than KLD_F16_REL of it, and is not the same figure (the F16 reference was used);
- the cached reference logits are kept per reference type.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from lrq import assets, tools
from lrq.cli.eval import main as eval_main

# A file against itself: the same logits on both sides; llama-perplexity stores the base's
# log-probabilities at 16 bits per value (a scale and minimum per token), so the KLD is 0 up to
# that storage (the bound tests/test_eval.py uses for a byte copy of the reference).  A reference
# of another type is not caught by this bound on the tiny model (the F32 file against its F16
# conversion: 1e-6), hence the no-copy check beside it.
KLD_SELF_MAX = 1e-5
# The F16 reference against the F32 one, for a Q4_0 file.  F16 keeps 11 significant bits: every
# weight moves by at most 2^-11 (4.9e-4) of itself, while Q4_0 moves it by up to half a step of
# 16 over its block's range (~2^-5 of the block's largest weight): the reference's log-probs move
# ~100x less than the quantized model's, and the KLD changes to first order in that move, by a
# fraction of a percent (measured 0.06 %: 0.090059 against 0.090115; a BF16 reference, 2^-8,
# moved it 0.26 %, a Q8_0 one 0.16 %).  1 % leaves room for another CPU's rounding; a reference
# that is not the source's F16 copy (a stock Q4_0 / Q2_K, the model itself: KLD 0) is far outside.
# The F16 reference row's own type column is checked beside it.
KLD_F16_REL = 0.01
CTX, CHUNKS = 128, 2


@pytest.fixture(scope="module")
def flat_text(tmp_path_factory):
    """Botchan on one line (the tiny vocabulary has no newline / byte tokens)."""
    p = tmp_path_factory.mktemp("ref-type-text") / "botchan-flat.txt"
    p.write_text(assets.path("botchan").read_text(encoding="utf-8").replace("\n", " ")[:60_000])
    return p


def _eval(ref, ref_type, models, text, work, csv_path, capsys, stock=()) -> tuple[dict, str]:
    argv = ["--ref", str(ref), "--ref-type", ref_type, "--text", str(text), "-c", str(CTX),
            "--chunks", str(CHUNKS), "-t", "2", "--work-dir", str(work), "--csv", str(csv_path), "-q",
            *map(str, models)]
    if stock:
        argv += ["--stock", ",".join(stock)]
    rc = eval_main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    return {r["label"]: r for r in csv.DictReader(open(csv_path))}, cap.out


def test_source_reference_is_the_file_itself(tiny_models, flat_text, tmp_path, capsys):
    src = tiny_models.gguf("llama", "f16")
    work = tmp_path / "w"
    rows, out = _eval(src, "source", [src], flat_text, work, tmp_path / "s.csv", capsys)
    assert set(rows) == {"source reference", src.name}
    same = rows[src.name]
    assert abs(float(same["kld"])) < KLD_SELF_MAX and float(same["top1"]) == 1.0
    assert {r["ref_type"] for r in rows.values()} == {"source:F16"}
    assert rows["source reference"]["file_type"] == "F16" and rows["source reference"]["path"] == str(src)
    assert "reference: the source file itself, F16; ref_type source:F16" in out
    # no copy of the source was made: only the reference logits are cached
    assert not list(work.glob("*.gguf"))


def test_f16_reference_kld_close_to_f32(tiny_models, flat_text, tmp_path, capsys):
    src = tiny_models.gguf("llama")                       # F32
    q4 = tmp_path / "q4_0.gguf"
    tools.run("llama-quantize", [str(src), str(q4), "Q4_0"])
    work = tmp_path / "w"
    kld = {}
    for t in ("F32", "F16"):
        rows, out = _eval(src, t, [q4], flat_text, work, tmp_path / f"{t}.csv", capsys)
        ref = rows[f"{t} reference"]
        assert ref["file_type"] == t and ref["ref_type"] == t and rows[q4.name]["ref_type"] == t
        assert f"ref_type {t})" in out
        kld[t] = float(rows[q4.name]["kld"])
    assert math.isfinite(kld["F32"]) and kld["F32"] > 0
    assert 0 < abs(kld["F16"] - kld["F32"]) < KLD_F16_REL * kld["F32"], kld
    # the reference logits are cached per reference: one entry each, the F16 one keyed by its type
    entries = sorted(work.glob("*.kld"))
    assert len(entries) == 2, entries
    recipes = [json.loads((e.parent / (e.name + ".json")).read_text())["recipe"] for e in entries]
    assert sorted(r.get("ref_type", "F32") for r in recipes) == ["F16", "F32"]
    # a stock file quantized from the F16 reference is its own cache entry, not the F32 one's
    rows, _ = _eval(src, "F16", [], flat_text, work, tmp_path / "s16.csv", capsys, stock=("Q4_0",))
    assert rows["Q4_0"]["path"].endswith("ref-F16.Q4_0.gguf") and rows["Q4_0"]["ref_type"] == "F16"


def test_bad_ref_type_is_refused(tmp_path, capsys):
    assert eval_main(["--ref", "smollm2-135m", "--ref-type", "Q4_0", "--stock", "Q4_0",
                      "--work-dir", str(tmp_path)]) == 2
    assert "--ref-type: 'Q4_0' is not one of F32, F16, BF16, Q8_0, source" in capsys.readouterr().err
