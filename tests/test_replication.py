"""Replicated schedules through the reference executor on converted LRQ files: replicas change
the logits, a replica whose output projections carry zero gain is an exact no-op, and the
parameter rewriter (lrq.convert.update) validates what it writes."""

from __future__ import annotations

import numpy as np
import pytest

from lrq.convert import ConvertOptions, convert
from lrq.convert.arch import ConvertError
from lrq.convert.update import set_replica_params
from lrq.lrq_file import LRQModelFile
from lrq.reference import Reference
from numerics import nmse

# a serial replica with zero gain on attn_output and ffn_down adds exactly 0 to the residual:
# the logits are bit-identical, so any bound above float64 noise would do
NOOP_NMSE = 1e-24
# a half-step grid offset on every replica moves the 2-bit model's logits by far more than this
CHANGED_NMSE = 1e-4
TOKENS = np.array([1, 17, 42, 99, 5, 250, 3, 77, 11, 200, 64, 128], dtype=np.int64)


def _convert(src, out, plan, **kw):
    convert(src, out, ConvertOptions(bits=2, group_size=32, plan=plan, progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    src = tiny_models.gguf("llama")
    d = tmp_path_factory.mktemp("replication")
    return {"none": _convert(src, d / "none.gguf", "none"),
            "all": _convert(src, d / "all.gguf", "all", grid_offset=0.5)}


def _logits(path):
    return Reference(LRQModelFile(path)).logits(TOKENS)


def test_replicas_change_logits(files):
    assert nmse(_logits(files["all"]), _logits(files["none"])) > CHANGED_NMSE


def test_zero_gain_replicas_equal_unreplicated(files, tmp_path):
    f = LRQModelFile(files["all"])
    params = {}
    for layer in range(f.hparams["n_layer"]):
        for w in ("attn_output", "ffn_down"):
            n_out = f.tensor_info(f"blk.{layer}.{w}.weight").shape[0]
            params[f"blk.{layer}.{w}.lrq_r1.gain"] = np.zeros(n_out, np.float32)
    out = set_replica_params(files["all"], tmp_path / "noop.gguf", params)
    assert LRQModelFile(out).schedule == f.schedule
    assert nmse(_logits(out), _logits(files["none"])) < NOOP_NMSE


def test_rewriter_refuses_bad_params_and_writes_nothing(files, tmp_path):
    out = tmp_path / "bad.gguf"
    cases = {
        "blk.0.attn_q.lrq_r1.gain": (np.ones(3, np.float32), "shape"),
        "blk.0.attn_q.lrq_r7.gain": (np.ones(64, np.float32), "never runs replica 7"),
        "blk.0.attn_norm.lrq_r1.gain": (np.ones(64, np.float32), "not an LRQ weight"),
        "blk.0.attn_q.lrq_r1.act": (np.array([1.5, 0], np.float32), "clip ratio"),
        "blk.0.attn_q.lrq_r1.bias": (np.full(64, np.nan, np.float32), "NaN"),
    }
    for name, (value, why) in cases.items():
        with pytest.raises(ConvertError, match=why):
            set_replica_params(files["all"], out, {name: value})
        assert not out.exists() and list(tmp_path.iterdir()) == []
