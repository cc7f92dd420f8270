"""lrq.model_file against the HF models the tiny GGUFs were converted from, and bad inputs."""

from __future__ import annotations

import struct
import sys
import types

import numpy as np
import pytest

from lrq.model_file import SUPPORTED_ARCHS, ModelFile, ModelFileError, open_model
from tiny_models import ARCHS

ALL = pytest.mark.parametrize("tiny_gguf", ARCHS, indirect=True)


def _hf_config(tiny_models, arch):
    import json
    return json.loads((tiny_models.hf(arch) / "config.json").read_text())


def _hf_state(tiny_models, arch):
    from safetensors.numpy import load_file
    return load_file(tiny_models.hf(arch) / "model.safetensors")


def test_hparams_match_hf_config(tiny_models, tiny_arch):
    m = open_model(tiny_models.gguf(tiny_arch))
    c = _hf_config(tiny_models, tiny_arch)
    hp = m.hparams
    assert isinstance(m, ModelFile) and m.arch == tiny_arch
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.n_ff, hp.n_vocab) == (
        c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
        c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"])
    assert hp.head_dim == (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    assert hp.rope_theta == c["rope_parameters"]["rope_theta"]
    assert hp.rms_eps == pytest.approx(c["rms_norm_eps"], rel=1e-6)   # stored as float32
    assert hp.tied_embeddings == c["tie_word_embeddings"]
    assert hp.qk_norm == (tiny_arch == "qwen3")
    assert hp.attn_qkv_bias == (tiny_arch == "qwen2")
    assert hp.rope_type == ("norm" if tiny_arch == "llama" else "neox")
    assert hp.attn_scale == pytest.approx(hp.head_dim ** -0.5)
    assert hp["n_layer"] == hp.n_layer          # dict-style access of the design doc


def test_schedule_is_one_serial_execution_per_layer(tiny_gguf):
    m = open_model(tiny_gguf)
    s = m.schedule
    assert [e.layer for e in s] == list(range(m.hparams.n_layer))
    assert all(e.replica == 0 and e.weight == 1.0 for e in s)
    assert len({e.group for e in s}) == len(s)          # every group has one execution: serial


def test_tensors_equal_hf_weights(tiny_models, tiny_arch):
    """F32 conversion is lossless: tensors equal the HF weights bit for bit (llama's q/k rows
    permuted by convert_hf_to_gguf.py into rope-adjacent pairs)."""
    m = open_model(tiny_models.gguf(tiny_arch))
    sd = _hf_state(tiny_models, tiny_arch)
    hp = m.hparams
    pairs = {"blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
             "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
             "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
             "token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight"}
    if tiny_arch == "qwen2":
        pairs["blk.2.attn_q.bias"] = "model.layers.2.self_attn.q_proj.bias"
        pairs["output.weight"] = "lm_head.weight"
    if tiny_arch == "qwen3":
        pairs["blk.0.attn_k_norm.weight"] = "model.layers.0.self_attn.k_norm.weight"
    for ours, theirs in pairs.items():
        t = m.tensor(ours)
        assert t.dtype == np.float64 and t.shape == sd[theirs].shape, ours
        np.testing.assert_array_equal(t, sd[theirs].astype(np.float64), err_msg=ours)
    q = m.tensor("blk.0.attn_q.weight")
    hf_q = sd["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    if tiny_arch == "llama":
        # GGUF row (h, 2i + j) is HF row (h, j * d/2 + i): undo it and compare
        d = hp.head_dim
        q = q.reshape(hp.n_head, d // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(q, hf_q)


def test_weight_of_plain_file_is_tensor_with_default_params(tiny_gguf):
    m = open_model(tiny_gguf)
    for replica in (0, 1):
        w, p = m.weight("blk.0.ffn_up.weight", replica)
        np.testing.assert_array_equal(w, m.tensor("blk.0.ffn_up.weight"))
        assert p.is_identity()
    with pytest.raises(ModelFileError, match="replica index -1"):
        m.weight("blk.0.ffn_up.weight", -1)


def test_vocab_metadata(tiny_gguf):
    m = open_model(tiny_gguf)
    assert m.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert len(m.tokens) == m.hparams.n_vocab == m.vocab.n_tokens
    # an SPM vocab: llama.cpp prepends BOS (id 1 here)
    assert (m.bos_id, m.add_bos, m.vocab.model) == (1, True, "llama")


def test_missing_tensor_names_file(tiny_gguf):
    with pytest.raises(ModelFileError, match=f"{tiny_gguf}.*'blk.9.attn_q.weight' is missing"):
        open_model(tiny_gguf).tensor("blk.9.attn_q.weight")


# ---- bad inputs ------------------------------------------------------------------------

def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileError, match=f"{p}: no such file"):
        open_model(p)


def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(b"this is not a model file at all\n" * 10)
    with pytest.raises(ModelFileError, match=f"{p}: not a GGUF file"):
        open_model(p)


@pytest.mark.parametrize("keep", [3, 40, 2000, "tensor-data"])
def test_truncated_file(tiny_gguf, tmp_path, keep):
    """Cut inside the magic, the header, the key/values, and the tensor data."""
    data = tiny_gguf.read_bytes()
    n = len(data) - 1000 if keep == "tensor-data" else keep
    p = tmp_path / "cut.gguf"      # a name without "truncated": the message must say it
    p.write_bytes(data[:n])
    with pytest.raises(ModelFileError, match=str(p)) as e:
        open_model(p)
    assert ("not a GGUF" if keep == 3 else "truncated") in str(e.value)


def _write_gguf(path, arch: str, extra_kv: dict | None = None):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for k, v in (extra_kv or {}).items():
        w.add_uint32(k, v)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_architecture_names_path_and_supported(tmp_path):
    p = _write_gguf(tmp_path / "mamba.gguf", "mamba")
    with pytest.raises(ModelFileError) as e:
        open_model(p)
    msg = str(e.value)
    assert str(p) in msg and "'mamba'" in msg
    assert all(a in msg for a in SUPPORTED_ARCHS)


def test_lrq_files_are_handed_to_lrq_file(tmp_path, monkeypatch):
    """open_model dispatches on the lrq.format_version key (the LRQ reader is tested elsewhere)."""
    opened = []
    fake = types.ModuleType("lrq.lrq_file")
    fake.LRQModelFile = lambda path: opened.append(path) or "LRQ"
    monkeypatch.setitem(sys.modules, "lrq.lrq_file", fake)
    p = _write_gguf(tmp_path / "lrq.gguf", "llama", {"lrq.format_version": 1})
    assert open_model(p) == "LRQ" and opened == [p]
    plain = _write_gguf(tmp_path / "plain.gguf", "mamba")
    with pytest.raises(ModelFileError):     # no lrq key: not dispatched
        open_model(plain)
    assert opened == [p]


def test_bad_gguf_version(tmp_path):
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    with pytest.raises(ModelFileError, match=f"{p}: unsupported GGUF version 9"):
        open_model(p)


@pytest.mark.slow
def test_smollm2_metadata():
    from lrq import assets
    m = open_model(assets.path("smollm2-135m"))
    hp = m.hparams
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.n_ff, hp.n_vocab) == (
        "llama", 30, 576, 9, 3, 1536, 49152)
    assert hp.tied_embeddings and not hp.qk_norm and not hp.attn_qkv_bias
    # SmolLM2's GGUF says add_bos_token = false: perplexity windows keep their first token
    assert m.add_bos is False and m.bos_id == 1
    assert m.tensor_type("blk.0.attn_q.weight") == "Q4_1"
    w = m.tensor("blk.0.attn_q.weight")
    assert w.shape == (576, 576) and np.isfinite(w).all() and w.std() > 0
