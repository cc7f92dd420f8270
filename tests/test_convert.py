"""lrq-convert and the LRQ file reader on the tiny random models (tests/tiny_models.py): the
written codes against lrq.quant run on the source independently, every key read back, the
schedule and replica tensors, bad inputs (non-zero exit, a message naming the culprit, nothing
left behind), and the reader's refusals."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from lrq import gguf_types
from lrq.cli import convert as convert_cli
from lrq.constants import FORMAT_VERSION, FORMAT_VERSION_MIN, Keys, LRQType, SUPPORTED_ARCHS, lrq_type
from lrq.gguf_write import GGUFStreamWriter, State, WriterError
from gguf_edit import read as _source, rewrite
from lrq.gguf_hparams import GGUFFileError
from lrq.lrq_file import LRQFileError, LRQModelFile
from lrq.quant import dequantize_codes, quantize, unpack

REPO = Path(__file__).resolve().parent.parent
# 4-bit g32 on the tiny models' Gaussian weights has NMSE ~0.006 per tensor; twice that fails a
# grid that is off by a level or a group layout mix-up (which give NMSE > 0.05).
NMSE_4BIT_BOUND = 0.012
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _src_weight(t):
    return np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))


def _run(argv, capsys):
    try:
        rc = convert_cli.main([str(a) for a in argv])
    except SystemExit as e:      # argparse errors
        rc = e.code
    return rc, capsys.readouterr().err


# ---- constants ----------------------------------------------------------------------------

def test_format_version_matches_c_header():
    h = (REPO / "native" / "include" / "lrq-format.h").read_text()
    assert int(re.search(r"#define LRQ_FORMAT_VERSION (\d+)", h).group(1)) == FORMAT_VERSION
    assert int(re.search(r"#define LRQ_FORMAT_VERSION_MIN (\d+)", h).group(1)) == FORMAT_VERSION_MIN


def test_lrq_type_ids_follow_every_known_type():
    assert [int(t) for t in LRQType] == list(range(LRQType.LRQ1, LRQType.LRQ1 + 4))
    stock_py = [int(t) for t in gguf.GGMLQuantizationType if not t.name.startswith("LRQ")]
    assert LRQType.LRQ1 > max(stock_py)
    # the patched ggml.h (patches/0002) is the binding reference: stock ids all below LRQ1 and
    # GGML_TYPE_LRQ<b> equal to ours
    text = (REPO / "build" / "llama.cpp" / "ggml" / "include" / "ggml.h").read_text()
    ids = {name: int(v) for name, v in re.findall(r"GGML_TYPE_(\w+)\s*=\s*(\d+),", text)}
    assert {n: v for n, v in ids.items() if n.startswith("LRQ")} == {t.name: int(t) for t in LRQType}
    assert ids.pop("COUNT") == LRQType.LRQ4 + 1
    assert max(v for n, v in ids.items() if not n.startswith("LRQ")) < LRQType.LRQ1
    assert set(SUPPORTED_ARCHS) == {"llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe"}
    assert all(v.startswith("lrq.") for v in Keys.all().values())
    assert len(set(Keys.all().values())) == len(Keys.all())


# ---- the writer's state machine --------------------------------------------------------------

def test_writer_refuses_wrong_order_and_leaves_nothing(tmp_path):
    out = tmp_path / "w.gguf"
    w = GGUFStreamWriter(out, "lrq-llama")
    with pytest.raises(WriterError, match="cannot write tensor"):
        w.write_tensor("a", np.zeros(4, np.float32))
    w.add_uint32("x.a", 1)
    w.add_tensor_info("a", (4,), int(gguf.GGMLQuantizationType.F32))
    with pytest.raises(WriterError, match="cannot add key"):
        w.add_uint32("x.b", 2)
    with pytest.raises(WriterError, match="cannot finish"):
        w.finish()
    w.add_tensor_info("b", (2, 64), int(lrq_type(2)))
    w.write_header()
    with pytest.raises(WriterError, match="cannot declare"):
        w.add_tensor_info("c", (4,), int(gguf.GGMLQuantizationType.F32))
    with pytest.raises(WriterError, match="out of order"):
        w.write_tensor("b", np.zeros((2, 16), np.uint8))
    with pytest.raises(WriterError, match="bytes given"):
        w.write_tensor("a", np.zeros(5, np.float32))
    w.write_tensor("a", np.arange(4, dtype=np.float32))
    with pytest.raises(WriterError, match="not written"):
        w.finish()
    assert not out.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_atomic_on_exception_and_round_trip(tmp_path):
    out = tmp_path / "w.gguf"
    with pytest.raises(RuntimeError, match="boom"):
        with GGUFStreamWriter(out, "lrq-llama") as w:
            w.add_tensor_info("a", (4,), int(gguf.GGMLQuantizationType.F32))
            w.write_header()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    codes = np.arange(2 * 16, dtype=np.uint8).reshape(2, 16)
    with GGUFStreamWriter(out, "lrq-llama") as w:
        w.add_array("x.arr", [1, 2, 3], gguf.GGUFValueType.UINT32)
        w.add_tensor_info("a", (2, 64), int(lrq_type(2)))
        w.write_header()
        w.write_tensor("a", codes)
        w.finish()
    assert w.state is State.DONE and out.stat().st_mode & 0o044   # ordinary permissions
    r, t = _source(out)
    assert r.fields["x.arr"].contents() == [1, 2, 3]
    assert int(t["a"].tensor_type) == LRQType.LRQ2 and np.array_equal(t["a"].data, codes)


# ---- conversion -------------------------------------------------------------------------------

@pytest.mark.parametrize("tiny_gguf", ["llama", "qwen2", "qwen3"], indirect=True)
def test_convert_matches_independent_quantization(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    rc, err = _run([tiny_gguf, out, "--bits", "2", "--group-size", "64", "--plan", "last-1",
                    "--grid-offset", "0.5", "--scale-delta", "0.1", "-q"], capsys)
    assert rc == 0, err
    src, st = _source(tiny_gguf)
    f = LRQModelFile(out)
    n_layer = int(src.fields[f"{f.arch}.block_count"].contents())
    assert f.kv["general.architecture"] == "lrq-" + f.arch
    assert f.hparams_dict["n_layer"] == n_layer
    assert [(e.layer, e.replica) for e in f.schedule] == \
        [(l, 0) for l in range(n_layer)] + [(n_layer - 1, 1)]
    lrq = set(f.lrq_weights())
    assert lrq == {f"blk.{l}.{k}.weight" for l in range(n_layer) for k in LINEARS}
    for name in sorted(lrq):
        qt = quantize(_src_weight(st[name]), 2, 64, "asym")
        got = f.quantized(name)
        assert np.array_equal(got.codes, qt.codes), name
        assert np.array_equal(got.scale, qt.scale) and np.array_equal(got.min, qt.min), name
    # replica 1 of the last layer: alpha = 1.1, beta = +0.5 per output channel (FORMAT.md 8)
    name = f"blk.{n_layer - 1}.ffn_down.weight"
    qt = f.quantized(name)
    w1, rp = f.weight(name, 1)
    q = unpack(qt.codes, 2, qt.n_in)
    d = qt.scale.astype(np.float64)[:, np.arange(qt.n_in) // 64]
    m = qt.min.astype(np.float64)[:, np.arange(qt.n_in) // 64]
    assert np.allclose(w1, np.float16(1.1) * d * (q + 0.5) + m, rtol=1e-12, atol=0)
    assert rp.gain is None and rp.bias is None and rp.act_bits == 0 and rp.gain_folded
    assert np.array_equal(f.weight(name, 0)[0], dequantize_codes(q, qt.scale, qt.min, 2, 64, "asym"))
    # every other tensor is the source's, byte for byte
    for t in src.tensors:
        if t.name not in lrq:
            info = f.tensor_info(t.name)
            assert info.type_id == int(t.tensor_type)
            assert np.array_equal(f.tensor(t.name), np.asarray(t.data, np.float64).reshape(info.shape))


def test_4bit_plan_none_keeps_weights_close(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "q4.gguf"
    rc, err = _run([tiny_gguf, out, "--bits", "4", "--group-size", "32", "--plan", "none", "-q"], capsys)
    assert rc == 0, err
    _, st = _source(tiny_gguf)
    f = LRQModelFile(out)
    assert f.plan.n_exec == f.hparams_dict["n_layer"]
    assert not any(".lrq_r" in n for n in f.tensor_names)
    for name in f.lrq_weights():
        w = _src_weight(st[name]).astype(np.float64)
        nmse = ((f.tensor(name) - w) ** 2).sum() / (w ** 2).sum()
        assert nmse < NMSE_4BIT_BOUND, name


def test_every_key_round_trips(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "k.gguf"
    plan = tmp_path / "plan.json"
    plan.write_text('{"layers": {"1": {"replicas": 2, "mode": "parallel"}}}')
    rc, err = _run([tiny_gguf, out, "--ternary", "--group-size", "32", "--scale-search", "mse",
                    "--rounding", "stochastic", "--noise", "0.25", "--seed", "77", "--grid-offset", "0.5",
                    "--scale-delta", "0.125", "--keep", "attn_v", "--plan", plan, "-q"], capsys)
    assert rc == 0, err
    r, _ = _source(out)        # read back with plain gguf-py, independently of LRQModelFile
    kv = {k: f.contents() for k, f in r.fields.items()}
    want = {Keys.FORMAT_VERSION: FORMAT_VERSION, Keys.BASE_ARCH: "llama", Keys.QUANT_MODE: "ternary",
            Keys.GROUP_SIZE: 32, Keys.BITS: 2, Keys.SCALE_SEARCH: "mse", Keys.ROUNDING: "stochastic",
            Keys.NOISE: 0.25, Keys.SEED: 77, Keys.INIT_SCALE_DELTA: 0.125, Keys.INIT_GRID_OFFSET: 0.5,
            Keys.SCHEDULE_LAYER: [0, 1, 1, 2], Keys.SCHEDULE_REPLICA: [0, 0, 1, 0],
            Keys.SCHEDULE_GROUP: [0, 1, 1, 2], Keys.PLAN: str(plan), Keys.KEEP: "attn_v",
            Keys.SOURCE: tiny_gguf.name}
    for k, v in want.items():
        assert kv[k] == v, k
    assert kv[Keys.SCHEDULE_WEIGHT] == [1.0, 0.5, 0.5, 1.0]
    assert kv[Keys.CONVERTER].startswith("lrq ")
    # every key but those of a stock-typed base (tests/test_stock_base.py writes those), of an
    # adapter (tests/test_adapter.py) and of expert replicas (MoE files, tests/test_moe_experts.py)
    adapter_keys = {v for k, v in Keys.all().items() if k.startswith(("ADAPTER_", "MOE_"))}
    assert set(Keys.all().values()) - {Keys.BASE_TYPE, Keys.BASE_IMATRIX} - adapter_keys == \
        set(k for k in kv if k.startswith("lrq.")), \
        "a key of lrq.constants.Keys is not written (or an unknown lrq.* key is)"
    # the recorded bpw equals an independent count over the tensors
    lrq_names = [t.name for t in r.tensors if int(t.tensor_type) in {int(x) for x in LRQType}]
    stems = tuple(n[:-len(".weight")] + "." for n in lrq_names)
    lrq_bytes = sum(int(t.n_bytes) for t in r.tensors if t.name in lrq_names or t.name.startswith(stems))
    n_w = sum(int(t.n_elements) for t in r.tensors if t.name in lrq_names)
    assert kv[Keys.BPW_LRQ] == pytest.approx(8 * lrq_bytes / n_w, rel=1e-6)
    # lrq.bpw.linears adds the kept (--keep attn_v) block linears
    kept = [t for t in r.tensors if re.fullmatch(r"blk\.\d+\.attn_v\.weight", t.name)]
    assert kept and all(t.name not in lrq_names for t in kept)
    lin_bytes = lrq_bytes + sum(int(t.n_bytes) for t in kept)
    n_lin = n_w + sum(int(t.n_elements) for t in kept)
    assert kv[Keys.BPW_LINEARS] == pytest.approx(8 * lin_bytes / n_lin, rel=1e-6)
    f = LRQModelFile(out)
    assert "blk.0.attn_v.weight" not in f.lrq_weights()          # --keep
    assert f.replica_params("blk.1.attn_q.weight", 1).scale_mult.ravel()[0] == np.float16(1.125)
    assert f.replica_params("blk.1.attn_q.weight", 1).grid_offset.ravel()[0] == 0.5
    assert set(np.unique(unpack(f.quantized("blk.0.attn_q.weight").codes, 2, 64))) <= {0, 1, 2}


def test_hf_directory_gives_the_same_file_as_its_gguf(tiny_hf, tiny_gguf, tmp_path, capsys):
    a, b = tmp_path / "from-hf.gguf", tmp_path / "from-gguf.gguf"
    assert _run([tiny_hf, a, "--plan", "all", "-q"], capsys)[0] == 0
    assert _run([tiny_gguf, b, "--plan", "all", "-q"], capsys)[0] == 0
    ra, ta = _source(a)
    rb, tb = _source(b)
    assert list(ta) == list(tb)
    for n in ta:
        assert np.array_equal(ta[n].data, tb[n].data), n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-gguf.gguf", "from-hf.gguf"]  # no temp left


# ---- bad input: non-zero exit, the culprit named, nothing left behind ---------------------------

def _gpt2_gguf(path):
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["truncated", "unsupported-arch", "plan-layer-99", "bits-5",
                                  "missing-out-dir", "unwritable-out", "missing-tensor", "not-gguf"])
def test_bad_input(case, tiny_gguf, tmp_path, capsys):
    src, outdir = tiny_gguf, tmp_path / "out"
    outdir.mkdir()
    out, extra = outdir / "x.gguf", []
    if case == "truncated":
        src = tmp_path / "trunc.gguf"
        src.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size * 2 // 3])
        expect = [str(src), "truncated"]
    elif case == "unsupported-arch":
        src = _gpt2_gguf(tmp_path / "gpt2.gguf")
        expect = [str(src), "'gpt2'", "llama, qwen2, qwen3"]
    elif case == "plan-layer-99":
        plan = tmp_path / "p99.json"
        plan.write_text('{"layers": {"99": {"replicas": 2}}}')
        extra, expect = ["--plan", plan], [str(plan), "layer 99", "3 layers"]
    elif case == "bits-5":
        extra, expect = ["--bits", "5"], ["--bits", "5"]
    elif case == "missing-out-dir":
        out, expect = outdir / "nodir" / "x.gguf", [str(outdir / "nodir"), "does not exist"]
    elif case == "unwritable-out":
        # /proc refuses new files even for root (a chmod-ed directory would not stop root)
        out, expect = Path("/proc/lrq-test-out.gguf"), ["/proc"]
    elif case == "missing-tensor":
        src = rewrite(tiny_gguf, tmp_path / "miss.gguf", drop={"blk.1.ffn_up.weight"})
        expect = [str(src), "blk.1.ffn_up.weight", "missing"]
    else:
        src = tmp_path / "text.gguf"
        src.write_text("this is not a gguf file, just some text long enough to be read\n")
        expect = [str(src), "not a GGUF"]
    rc, err = _run([src, out, "-q", *extra], capsys)
    assert rc != 0
    for e in expect:
        assert e in err, (e, err)
    assert "Traceback" not in err
    assert list(outdir.iterdir()) == [] and not out.exists()


def test_nothing_left_when_quantization_fails_midway(tiny_gguf, tmp_path, capsys):
    # a NaN in the last block linear is only seen after the header and most tensors are written
    r, st = _source(tiny_gguf)
    name = "blk.2.ffn_down.weight"
    bad = _src_weight(st[name]).copy()
    bad[0, 0] = np.nan
    src = rewrite(tiny_gguf, tmp_path / "nan.gguf", replace={name: (bad, int(gguf.GGMLQuantizationType.F32))})
    outdir = tmp_path / "o"
    outdir.mkdir()
    rc, err = _run([src, outdir / "x.gguf", "-q"], capsys)
    assert rc == 1 and name in err and "NaN" in err
    assert list(outdir.iterdir()) == []


# ---- the reader's refusals ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lrq_tiny(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("lrq") / "tiny.lrq.gguf"
    assert convert_cli.main([str(tiny_models.gguf("llama")), str(out), "--plan", "last-1",
                             "--grid-offset", "0.5", "-q"]) == 0
    return out


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1])
def test_reader_refuses_other_format_version(lrq_tiny, tmp_path, version):
    bad = rewrite(lrq_tiny, tmp_path / f"v{version}.gguf",
                  kv={Keys.FORMAT_VERSION: (version, gguf.GGUFValueType.UINT32)})
    with pytest.raises(LRQFileError) as ei:
        LRQModelFile(bad)
    msg = str(ei.value)
    assert str(bad) in msg and f"version {version} " in msg and f"{FORMAT_VERSION_MIN}..{FORMAT_VERSION}" in msg


def test_reader_reads_version_1_files(lrq_tiny, tmp_path):
    # a v1 file (LRQ codes only) is a valid v2 file: it still loads, with the same weights
    old = rewrite(lrq_tiny, tmp_path / "v1.gguf", kv={Keys.FORMAT_VERSION: (1, gguf.GGUFValueType.UINT32)})
    a, b = LRQModelFile(old), LRQModelFile(lrq_tiny)
    assert (a.version, b.version) == (1, FORMAT_VERSION)
    name = "blk.2.ffn_down.weight"
    np.testing.assert_array_equal(a.weight(name, 1)[0], b.weight(name, 1)[0])


@pytest.mark.parametrize("case,expect", [
    ("missing-scale", "blk.0.attn_q.lrq_scale"),
    ("scale-shape", "blk.0.attn_q.lrq_scale has shape"),
    ("orphan-replica", "blk.0.attn_q.lrq_r3.grid_offset"),
    ("schedule-layer", "layer 99 does not exist"),
    ("bad-key", Keys.GROUP_SIZE),
    ("truncated", "truncated"),
])
def test_reader_errors_name_the_culprit(case, expect, lrq_tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    f16 = int(gguf.GGMLQuantizationType.F16)
    if case == "missing-scale":
        rewrite(lrq_tiny, bad, drop={"blk.0.attn_q.lrq_scale"})
    elif case == "scale-shape":
        rewrite(lrq_tiny, bad, replace={"blk.0.attn_q.lrq_scale": (np.ones((64, 2), np.float16), f16)})
    elif case == "orphan-replica":
        rewrite(lrq_tiny, bad, add={"blk.0.attn_q.lrq_r3.grid_offset": (np.zeros((64, 1), np.float16), f16)})
    elif case == "schedule-layer":
        f = LRQModelFile(lrq_tiny)
        layers = [e.layer for e in f.schedule]
        layers[-1] = 99
        rewrite(lrq_tiny, bad, kv={Keys.SCHEDULE_LAYER: (layers, gguf.GGUFValueType.ARRAY,
                                                         gguf.GGUFValueType.UINT32)})
    elif case == "bad-key":
        rewrite(lrq_tiny, bad, kv={Keys.GROUP_SIZE: (48, gguf.GGUFValueType.UINT32)})
    else:
        bad.write_bytes(lrq_tiny.read_bytes()[:-1000])
    with pytest.raises(GGUFFileError) as ei:     # LRQFileError is one
        LRQModelFile(bad)
    assert expect in str(ei.value) and str(bad) in str(ei.value)


# ---- the shared model interface (lrq.model_file.open_model dispatches LRQ files here) ---------

def test_open_model_gives_the_lrq_reader_with_the_base_models_view(lrq_tiny, tiny_models, tmp_path):
    from lrq.model_file import open_model
    from lrq.reference import Reference
    plain = open_model(tiny_models.gguf("llama"))
    f = open_model(lrq_tiny)
    assert isinstance(f, LRQModelFile)
    assert f.hparams == plain.hparams and f.hparams["n_layer"] == f.hparams.n_layer == 3
    assert (f.bos_id, f.add_bos, f.vocab) == (plain.bos_id, plain.add_bos, plain.vocab)
    assert f.has_tensor("blk.0.attn_q.lrq_scale") and not plain.has_tensor("blk.0.attn_q.lrq_scale")
    # the reference executor runs the LRQ file's schedule: with --plan none and 4 bits its
    # logits follow the plain model's closely (independent float64 paths over the same tokens)
    q4 = tmp_path / "q4.gguf"
    assert convert_cli.main([str(tiny_models.gguf("llama")), str(q4), "--bits", "4", "--group-size",
                             "32", "-q"]) == 0
    tokens = [1, 17, 42, 99, 5, 230]
    a = Reference(open_model(q4)).logits(tokens)
    b = Reference(plain).logits(tokens)
    assert a.shape == b.shape and np.isfinite(a).all()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > LOGIT_CORR_4BIT


# 4-bit g32 weights (NMSE ~0.006) move the tiny model's logits only slightly; an LRQ file read
# with the wrong grid or the wrong tensor layout gives uncorrelated logits (< 0.5)
LOGIT_CORR_4BIT = 0.95
