"""Mixed precision with the two-level layout (lrq-convert --layout two-level --mix): the tensors
the mix gives 2 bits take the two-level layout, the wider ones single-level LRQ3 / LRQ4 groups of
the file's one group size (docs/two_level.md, "--mix with the two-level layout").  Both readers
accept the mixed file and agree; lrq-inspect / lrq-eval label the layout.
"""

from __future__ import annotations

import numpy as np
import pytest

from lrq import _native, quant_two_level as tl
from lrq.constants import sub_name
from lrq.convert import ConvertOptions, convert
from lrq.convert.mix import parse_mix
from lrq.lrq_file import LRQModelFile
from lrq.quant import dequantize, quantize
from lrq.reference import Reference
from numerics import nmse
from tiny_models import TINY_VOCAB

# Native with LRQ_CPU_REF=1 (double-sum reference kernels, F32 KV, no flash attention) against the
# float64 reference: the same bound as tests/test_two_level_file.py (measured there 1.4e-13 for
# an all-two-level file).  A reader that took the LRQ3 / LRQ4 weights of a mixed file as
# two-level (or the reverse) computes another model: the control below (the single-level groups
# of the same widths dropped to 2 bits) lands above 100x the fast bound.
NATIVE_REF_NMSE = 1e-9
# The int8 fast path against the reference: the activation rounding through 3 random layers;
# measured 7.8e-4 .. 1.1e-3 for all-two-level files, the wider codes add less error than they
# remove.  A kernel that ignored the sub-block bytes or mixed the bit widths gives >= 0.1.
NATIVE_FAST_NMSE = 5e-3
THREADS = 2
MIX = "q2k"          # attn_v 4 bits, attn_output and ffn_down 3 bits, the rest 2 (two-level)
GROUP = 256


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    src = tiny_models.gguf("llama")
    d = tmp_path_factory.mktemp("two-level-mix")
    out = {"src": src, "mix": d / "mix.gguf", "tl": d / "tl.gguf"}
    convert(src, out["mix"], ConvertOptions(bits=2, group_size=GROUP, two_level=16, mix=MIX, plan="all",
                                            progress=False))
    convert(src, out["tl"], ConvertOptions(bits=2, group_size=GROUP, two_level=16, plan="all", progress=False))
    return out


def test_mix_takes_both_layouts(files):
    f = LRQModelFile(files["mix"])
    from lrq.model_file import open_model
    m = open_model(files["src"])
    mix = parse_mix(MIX)
    seen = set()
    for name in f.lrq_weights():
        bits = mix.bits_for(name, 2)
        seen.add(bits)
        w = m.tensor(name).astype(np.float32)
        n_out, n_in = f.tensor_info(name).shape
        if bits == 2:
            assert f.is_two_level(name)
            assert f.tensor_info(sub_name(name)).shape == (n_out, n_in // 16)
            want = tl.dequantize(tl.quantize(w, super_size=GROUP, sub_size=16))
        else:
            # single-level groups of the file's group size, FORMAT.md's reference quantizer
            assert not f.is_two_level(name) and not f.has_tensor(sub_name(name))
            want = dequantize(quantize(w, bits, GROUP, "asym"))
        assert f.tensor_info(name).lrq_bits == bits
        assert np.array_equal(f.tensor(name), want), name
    assert seen == {2, 3, 4}


def test_native_matches_the_reference(files, monkeypatch):
    toks = np.random.default_rng(11).integers(3, TINY_VOCAB, size=40).astype(np.int32)
    toks[0] = 1
    ref = Reference(files["mix"]).logits(toks)
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    got = _native.Model(str(files["mix"]), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0).eval(toks)
    assert nmse(got, ref) < NATIVE_REF_NMSE
    monkeypatch.delenv("LRQ_CPU_REF")
    fast = _native.Model(str(files["mix"]), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0).eval(toks)
    assert nmse(fast, ref) < NATIVE_FAST_NMSE
    # control: the all-two-level file (the same 2-bit tensors, v / o / down at 2 bits) is another
    # model, far outside both bounds
    assert nmse(Reference(files["tl"]).logits(toks), ref) > 100 * NATIVE_FAST_NMSE


def test_labels_name_the_layout(files, tmp_path, capsys):
    """lrq-eval's type column and lrq-inspect say two-level and the sub-block / super-block sizes
    (the old label, "LRQ2 g256", did not tell a two-level file from 2-bit groups of 256)."""
    from lrq.cli import convert as convert_cli, inspect as inspect_cli
    from lrq.eval.bpw import file_bpw
    assert file_bpw(files["tl"]).file_type == "LRQ2 two-level B16/S256"
    # the tiny llama's q, k, gate, up (2 bits, two-level) outweigh v (4) and o, down (3)
    assert file_bpw(files["mix"]).file_type == "LRQ2 two-level B16/S256 + LRQ3, LRQ4"
    # control: the CLI's --layout two-level:32 --mix v4 file says B32 and only LRQ4 beside it; a
    # single-level file keeps its old label
    out32 = tmp_path / "tl32.gguf"
    assert convert_cli.main([str(files["src"]), str(out32), "--bits", "2", "--group-size", "128",
                             "--layout", "two-level:32", "--mix", "v4", "-q"]) == 0
    assert file_bpw(out32).file_type == "LRQ2 two-level B32/S128 + LRQ4"
    single = tmp_path / "single.gguf"
    convert(files["src"], single, ConvertOptions(bits=2, group_size=64, plan="all", progress=False))
    assert file_bpw(single).file_type == "LRQ2 g64"
    capsys.readouterr()
    assert inspect_cli.main([str(files["mix"]), "--no-tensors"]) == 0
    assert "  layout: LRQ2 two-level B16/S256 + LRQ3, LRQ4\n" in capsys.readouterr().out
    assert inspect_cli.main([str(out32), "--json"]) == 0
    import json
    assert json.loads(capsys.readouterr().out)["layout"] == "LRQ2 two-level B32/S128 + LRQ4"


def test_refusals_with_mix(files, tmp_path):
    """--mix does not lift the two-level layout's own conditions; --scale-search mse is refused
    without a mix (no single-level tensor would use it) and allowed with one."""
    from lrq.convert.arch import ConvertError
    with pytest.raises(ConvertError, match="--bits 2"):
        convert(files["src"], tmp_path / "x.gguf", ConvertOptions(bits=3, group_size=GROUP, two_level=16,
                                                                  mix=MIX, progress=False))
    with pytest.raises(ConvertError, match="mse"):
        convert(files["src"], tmp_path / "x.gguf", ConvertOptions(bits=2, group_size=GROUP, two_level=16,
                                                                  scale_search="mse", progress=False))
    assert not list(tmp_path.iterdir())
    out = tmp_path / "mse.gguf"
    convert(files["src"], out, ConvertOptions(bits=2, group_size=GROUP, two_level=16, mix=MIX,
                                              scale_search="mse", plan="all", progress=False))
    f = LRQModelFile(out)
    assert {f.is_two_level(n) for n in f.lrq_weights()} == {True, False}
