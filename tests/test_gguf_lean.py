"""lrq.gguf_lean.LeanGGUFReader against gguf-py's GGUFReader: the same fields, field by field.

Every reader of lrq (open_reader, ModelFile) parses with the lean reader; gguf-py's own reader is
the reference.  Compared on a GGUF holding every value type (empty arrays, nested arrays,
non-UTF-8 strings), the tiny models, an LRQ file, the bundled SmolLM2 and a truncated file.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from lrq import assets
from lrq.convert import ConvertOptions, convert
from lrq.gguf_hparams import GGUFFileError, open_reader, read_field
from lrq.gguf_lean import LeanGGUFReader


def _outcome(f, *args):
    """f(*args), or the type of what it raised (a non-UTF-8 string raises in both readers)."""
    try:
        return f(*args)
    except Exception as e:      # noqa: BLE001 -- compared, not handled
        return type(e)


def assert_same_fields(path):
    lean, stock = LeanGGUFReader(path), gguf.GGUFReader(path)
    assert list(lean.fields) == list(stock.fields)
    for k, b in stock.fields.items():
        a = lean.fields[k]
        assert (a.offset, a.name, a.types) == (b.offset, b.name, b.types), k
        assert list(a.data) == list(b.data), k
        assert len(a.parts) == len(b.parts), k
        for i in b.data:
            pa, pb = a.parts[i], b.parts[i]
            assert pa.dtype == pb.dtype and pa.shape == pb.shape and bytes(pa) == bytes(pb), (k, i)
        va, vb = read_field(a), read_field(b)
        assert (np.array_equal(va, vb) if isinstance(vb, np.ndarray) else va == vb), k
        if b.types and b.types[0] == gguf.GGUFValueType.ARRAY and b.data:
            for index in (0, -1, slice(1, 3)):
                assert _outcome(a.contents, index) == _outcome(b.contents, index), (k, index)
    assert [(t.name, int(t.data_offset), int(t.n_bytes), t.tensor_type) for t in lean.tensors] == \
        [(t.name, int(t.data_offset), int(t.n_bytes), t.tensor_type) for t in stock.tensors]
    for ta, tb in zip(lean.tensors, stock.tensors):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    path = tmp_path_factory.mktemp("lean") / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7); w.add_int8("t.i8", -7); w.add_uint16("t.u16", 700); w.add_int16("t.i16", -700)
    w.add_uint32("t.u32", 70000); w.add_int32("t.i32", -70000); w.add_float32("t.f32", 0.5)
    w.add_uint64("t.u64", 1 << 40); w.add_int64("t.i64", -(1 << 40)); w.add_float64("t.f64", 0.25)
    w.add_bool("t.bool", True); w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "", "ü" * 300, "z"])
    w.add_array("t.strs_empty", [])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_key_value("t.bytes", [b"\xff\xfe", b"ok"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    w.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_every_value_type(every_type):
    assert_same_fields(every_type)


def test_tiny_models_and_an_lrq_file(tiny_models, tmp_path):
    for arch in ("llama", "qwen2", "qwen3"):
        assert_same_fields(tiny_models.gguf(arch))
    out = tmp_path / "lrq2.gguf"
    convert(tiny_models.gguf("qwen2"), out, ConvertOptions(bits=2, group_size=32, plan="last-1", progress=False))
    assert_same_fields(out)


def test_bundled_model():
    """49,152 tokens and 48,900 merges: gguf-py makes ~200,000 views of them, the lean reader none."""
    assert_same_fields(assets.path("smollm2-135m"))


def test_truncated_string_array_is_refused(every_type, tmp_path):
    data = every_type.read_bytes()
    cut = data.index("ü".encode() * 10) + 5          # inside the long string of t.strs
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(GGUFFileError, match="cut.gguf"):
        open_reader(bad)
