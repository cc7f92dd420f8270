"""Mixed precision (`lrq-convert --mix`, lrq.convert.mix): each block linear gets the bits of the
first rule that matches its name, the file records them in each tensor's LRQ type, and the
runtime, the reference executor and the bpw accounting all follow the types.

Independent references: the tensor types are read back with gguf-py (not lrq's reader); the bpw
is recomputed from the shapes and FORMAT.md's formula (bits + 32 / group for asym codes with fp16
scale and min); the patched llama.cpp's logits are compared with the float64 reference executor
on the spec's arithmetic, where the graph is exact (tests/test_runtime.py, EXACT_NMSE)."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest

from lrq import _native
from lrq.cli.convert import main as convert_main
from lrq.constants import Keys, lrq_bits
from lrq.convert import ConvertError, ConvertOptions, convert
from lrq.convert.mix import MIX_PRESETS, MixError, parse_mix
from lrq.model_file import open_model
from lrq.reference import Reference
from numerics import nmse
from tiny_models import TINY_VOCAB

# the same bound as tests/test_runtime.py: the op on the spec's arithmetic, F32 KV, no flash
# attention; a file whose mixed tensors were read with the wrong width is off by NMSE > 1e-3
EXACT_NMSE = 1e-9
# the bpw key is float32: 2**-20 relative is float32 rounding, a tensor counted at the wrong
# width moves it by > 1e-2
BPW_REL = 2.0 ** -20

RULES = r"attn_v\.=4,blk\.0\.ffn_down\.=1,ffn_down\.=3"


def _expected_bits(name: str, default: int) -> int:
    # the rules above, written out by hand (not through parse_mix)
    if ".attn_v." in name:
        return 4
    if name.startswith("blk.0.ffn_down."):
        return 1
    if ".ffn_down." in name:
        return 3
    return default


def _types(path) -> dict[str, int]:
    r = gguf.GGUFReader(str(path))
    return {t.name: int(t.tensor_type) for t in r.tensors}


@pytest.fixture(scope="module")
def mixed(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    src = tiny_models.gguf("llama")
    out = root / "mixed.gguf"
    convert(src, out, ConvertOptions(bits=2, group_size=32, mix=RULES, plan="last-1",
                                     grid_offset=0.5, progress=False))
    uniform = root / "uniform.gguf"
    convert(src, uniform, ConvertOptions(bits=2, group_size=32, plan="last-1",
                                         grid_offset=0.5, progress=False))
    return src, out, uniform


def test_each_linear_gets_its_rules_bits(mixed):
    src, out, _ = mixed
    types = _types(out)
    linears = [n for n in types if lrq_bits(types[n]) is not None]
    assert len(linears) >= 7
    seen = set()
    for n in linears:
        assert lrq_bits(types[n]) == _expected_bits(n, 2), n
        seen.add(lrq_bits(types[n]))
    assert seen == {1, 2, 3, 4}
    # every other tensor keeps its source type, as without --mix
    src_types = _types(src)
    for n, t in types.items():
        if lrq_bits(t) is None and ".lrq" not in n:
            assert t == src_types[n], n


def test_bpw_counts_each_width(mixed):
    _, out, _ = mixed
    r = gguf.GGUFReader(str(out))
    n_w = bits = 0.0
    for t in r.tensors:
        b = lrq_bits(int(t.tensor_type))
        if b is not None:
            n = int(np.prod(t.shape))
            n_w += n
            bits += n * (b + 2 * 16 / 32)          # asym: fp16 scale + fp16 min per 32 weights
    # replica 1 of the last layer: F16 parameter tensors (grid offset) count too
    for t in r.tensors:
        if ".lrq_r" in t.name:
            bits += int(t.n_bytes) * 8
    got = float(r.fields[Keys.BPW_LRQ].parts[-1][0])
    assert abs(got - bits / n_w) <= BPW_REL * got, (got, bits / n_w)


def test_runtime_runs_mixed_widths_exactly(mixed, monkeypatch):
    _, out, uniform = mixed
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    native = _native.Model(str(out), n_ctx=64, n_threads=2, kv_f32=True, flash_attn=0)
    toks = np.random.default_rng(3).integers(3, TINY_VOCAB, size=40).astype(np.int32)
    toks[0] = 1
    got = native.eval(toks)
    assert nmse(got, Reference(open_model(out)).logits(toks)) < EXACT_NMSE
    # the control: the same model at one width (what reading every tensor as --bits gives)
    control = nmse(got, Reference(open_model(uniform)).logits(toks))
    assert control > 1e6 * EXACT_NMSE, control


def test_presets_parse_and_match_llama_cpp_q2k():
    for name in MIX_PRESETS:
        assert parse_mix(name).rules
    q2k = parse_mix("q2k")
    got = {s: q2k.bits_for(f"blk.3.{s}.weight", 2)
           for s in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert got == {"attn_q": 2, "attn_k": 2, "attn_v": 4, "attn_output": 3,
                   "ffn_gate": 2, "ffn_up": 2, "ffn_down": 3}
    assert parse_mix(None).bits_for("blk.0.attn_v.weight", 3) == 3


@pytest.mark.parametrize("spec, needle", [
    ("attn_v=5", "bits must be one of"),
    ("attn_v", "neither a preset"),
    ("=3", "neither a preset"),
    ("attn_v(=4", "not a valid regular expression"),
    ("attn_v=x", "bits must be one of"),
])
def test_bad_rules_are_named(spec, needle):
    with pytest.raises(MixError, match=re.escape(needle)):
        parse_mix(spec)


def test_bad_mix_is_a_clear_cli_error(tiny_models, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    rc = convert_main([str(tiny_models.gguf("llama")), str(out), "--mix", "ffn_down=7", "-q"])
    assert rc != 0 and not out.exists()
    assert "ffn_down=7" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="ternary"):
        ConvertOptions(mode="ternary", mix="q2k").validate()
    with pytest.raises(ConvertError, match="--mix"):
        ConvertOptions(base_type="Q2_K", mix="q2k").validate()
