"""lrq-inspect reads back every field the converter wrote (checked against gguf-py's own view of
the file), reports bpw, and refuses invalid files with a clear message."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from lrq import assets, gguf_types
from lrq.cli import convert as convert_cli
from lrq.cli import inspect as inspect_cli
from lrq.constants import FORMAT_VERSION, Keys, LRQType, is_aux_tensor

# SmolLM2 2-bit asym g64 against its Q4_1 source dequantized by gguf-py (the F32 reference):
# 2-bit round-to-nearest measures NMSE 0.22 (blk.29.ffn_down) .. 0.28 (blk.0.attn_q); the bound
# is the worst x 1.25.  A grid off by a level or a group layout mix-up gives NMSE > 1.
SMOL_2BIT_NMSE_BOUND = 0.35
# g64 asym: 2 code bits + fp16 scale and min per 64 weights
SMOL_2BIT_G64_BPW = 2 + 16 / 64 + 16 / 64


def _reader(path):
    gguf_types.register()
    return gguf.GGUFReader(path)


def _inspect_json(path, capsys):
    rc = inspect_cli.main([str(path), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _independent_bpw(r):
    lrq_ids = {int(t) for t in LRQType}
    lrq = [t for t in r.tensors if int(t.tensor_type) in lrq_ids]
    aux = [t for t in r.tensors if is_aux_tensor(t.name)]
    n_lrq = sum(int(t.n_elements) for t in lrq)
    lrq_bpw = 8 * sum(int(t.n_bytes) for t in lrq + aux) / n_lrq
    n_base = sum(int(t.n_elements) for t in r.tensors if not is_aux_tensor(t.name))
    file_bpw = 8 * sum(int(t.n_bytes) for t in r.tensors) / n_base
    return lrq_bpw, file_bpw


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "tiny.lrq.gguf"
    src = tiny_models.gguf("qwen3")
    assert convert_cli.main([str(src), str(out), "--bits", "3", "--sym", "--group-size", "128",
                             "--plan", "progressive", "--grid-offset", "0.5", "--scale-delta", "0.05",
                             "-q"]) == 0
    return src, out


def test_json_reports_every_field(converted, capsys):
    src, out = converted
    info = _inspect_json(out, capsys)
    r = _reader(out)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    # every lrq.* key, exactly
    assert info["lrq_metadata"] == {k: v for k, v in kv.items() if k.startswith("lrq.")}
    # (the lrq.adapter.* keys belong to adapter files, FORMAT.md 11, never to a model; lrq.moe.*
    # to MoE files with expert replicas, tests/test_moe_experts.py)
    assert set(info["lrq_metadata"]) == {k for k in Keys.all().values()
                                         if not k.startswith(("lrq.adapter.", "lrq.moe."))} \
        - {Keys.KEEP, Keys.BASE_TYPE, Keys.BASE_IMATRIX}
    # every other key (long arrays summarised by their length)
    assert set(info["metadata"]) == {k for k in kv if not k.startswith("lrq.")}
    for k, v in info["metadata"].items():
        if isinstance(v, dict) and "array_length" in v:
            assert v["array_length"] == len(kv[k])
        else:
            assert v == kv[k], k
    # schedule
    assert [e["layer"] for e in info["schedule"]] == kv[Keys.SCHEDULE_LAYER] == [0, 1, 1, 2, 2, 2]
    assert [e["replica"] for e in info["schedule"]] == kv[Keys.SCHEDULE_REPLICA] == [0, 0, 1, 0, 1, 2]
    assert [e["group"] for e in info["schedule"]] == kv[Keys.SCHEDULE_GROUP]
    # tensors: name, type, shape, bytes as gguf-py sees them
    assert [(t["name"], t["type_id"], t["shape"], t["bytes"]) for t in info["tensors"]] == \
        [(t.name, int(t.tensor_type), list(reversed(t.shape.tolist())), int(t.n_bytes)) for t in r.tensors]
    assert {t["type"] for t in info["tensors"] if t["name"].endswith("attn_q.weight")} == {"LRQ3"}
    # hyper-parameters from the base-prefixed keys
    src_kv = {k: f.contents() for k, f in _reader(src).fields.items()}
    h = info["hparams"]
    assert (h["n_layer"], h["n_embd"], h["n_head"], h["n_head_kv"], h["n_ff"]) == tuple(
        src_kv[f"qwen3.{k}"] for k in ("block_count", "embedding_length", "attention.head_count",
                                       "attention.head_count_kv", "feed_forward_length"))
    assert h["qk_norm"] is True and h["head_dim"] == src_kv["qwen3.attention.key_length"]
    # bpw, against an independent count
    lrq_bpw, file_bpw = _independent_bpw(r)
    assert info["bpw"]["lrq"] == pytest.approx(lrq_bpw, rel=1e-12)
    assert info["bpw"]["lrq_recorded"] == pytest.approx(lrq_bpw, rel=1e-6)
    assert info["bpw"]["file"] == pytest.approx(file_bpw, rel=1e-12)
    assert info["counts"]["file_bytes"] == out.stat().st_size
    assert info["quant"] == {"mode": "sym", "group_size": 128, "bits": 3, "scale_search": "minmax",
                             "rounding": "nearest", "base_type": None, "base_imatrix": None,
                             "linear_types": ["LRQ3"]}
    assert info["format_version"] == FORMAT_VERSION and info["architecture"] == "lrq-qwen3"


def test_text_output(converted, capsys):
    _, out = converted
    assert inspect_cli.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert f"LRQ format v{FORMAT_VERSION}, lrq-qwen3 (base qwen3)" in text
    assert "quant: sym, 3 bits, group 128" in text
    assert "schedule: 6 executions over 3 layers; 2 layers replicated" in text
    assert "lrq.init.grid_offset = 0.5" in text
    assert "blk.2.ffn_down.lrq_r2.grid_offset" in text


@pytest.mark.parametrize("case", ["plain-gguf", "garbage", "missing"])
def test_invalid_files(case, tiny_gguf, tmp_path, capsys):
    if case == "plain-gguf":
        path, expect = tiny_gguf, "not an LRQ file"
    elif case == "garbage":
        path, expect = tmp_path / "g.gguf", "not a GGUF file"
        path.write_bytes(b"\x00" * 100)
    else:
        path, expect = tmp_path / "none.gguf", "no such file"
    rc = inspect_cli.main([str(path)])
    err = capsys.readouterr().err
    assert rc == 1 and expect in err and str(path) in err


@pytest.mark.slow
def test_smollm2_convert_and_inspect(tmp_path, capsys):
    src = assets.path("smollm2-135m")
    out = tmp_path / "smol.lrq.gguf"
    assert convert_cli.main([str(src), str(out), "--bits", "2", "--group-size", "64",
                             "--plan", "last-2", "--grid-offset", "0.5", "-q"]) == 0
    info = _inspect_json(out, capsys)
    assert info["hparams"]["n_layer"] == 30 and info["hparams"]["n_embd"] == 576
    assert len(info["schedule"]) == 32
    assert info["counts"]["lrq_weights"] == 30 * 7
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "LRQ2"
    # 576-wide rows at g64: 9 groups; replica tensors of the last 2 layers add a little
    assert SMOL_2BIT_G64_BPW < info["bpw"]["lrq"] < SMOL_2BIT_G64_BPW + 0.01
    lrq_bpw, file_bpw = _independent_bpw(_reader(out))
    assert info["bpw"]["file"] == pytest.approx(file_bpw, rel=1e-12)
    from lrq.lrq_file import LRQModelFile
    f = LRQModelFile(out)
    st = {t.name: t for t in _reader(src).tensors}
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        ref = gguf.quants.dequantize(st[name].data, st[name].tensor_type).astype(np.float64)
        nmse = ((f.tensor(name) - ref) ** 2).sum() / (ref ** 2).sum()
        assert nmse < SMOL_2BIT_NMSE_BOUND, (name, nmse)
