"""Smoke run of the Python fuzz target (bench/fuzz/py_target.py; the campaigns, atheris and
libFuzzer on the C++ loader, are bench/fuzz/run.py, figures in docs/RESULTS.md "Fuzzing").

- the real seed files are accepted by every reader (the control: a target that refuses
  everything, or a harness that never gets past its own set-up, fails here);
- a table of hand-made corruptions (truncations, magic, GGUF version, LRQ format version,
  schedule, key type) is refused with the readers' own errors, never another exception type;
- a couple of hundred deterministic random mutations of the seeds (byte changes in the header and
  key region, dictionary words spliced in, truncations) raise nothing but the readers' own errors
  (apart from KNOWN findings, none now);
- every finding of the campaigns has a minimal reproducer here: fixed ones are regression tests,
  an open one is xfail(strict=True) (a fix makes it pass, which fails the run until the mark goes);
- the atheris harness (run.py's worker; atheris is a dev dependency) runs 100 executions.
"""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrq.constants import Keys
from lrq.convert import ConvertOptions, convert
from lrq.convert.update import set_replica_params

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "bench" / "fuzz"

# Deterministic mutations per smoke run: a couple of hundred keep the test at a few seconds (a reader
# run is ~5-20 ms) while every seed gets mutated many times.
N_MUTATIONS = 200
# Findings of the fuzz campaign not fixed yet (a signature stage:ExceptionType@file:line is matched
# without its line, which moves with unrelated edits), each with an xfail test below.  Empty: every
# finding so far is fixed and has a regression test below.
KNOWN: set[str] = set()


def _load(name: str, file: Path):
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


target = _load("lrq_fuzz_py_target", FUZZ / "py_target.py")


@pytest.fixture(scope="module")
def seeds(tiny_models, tmp_path_factory) -> dict[str, bytes]:
    """The plain tiny llama and an LRQ file of it (LRQ2 asym codes, a serial and a parallel
    replica, gain / bias / act on replica 1): the seeds' two kinds, at the tests' model size."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    src = tiny_models.gguf("llama")
    plan = root / "plan.json"
    plan.write_text(json.dumps({"layers": {"0": {"replicas": 2, "mode": "serial"},
                                           "2": {"replicas": 2, "mode": "parallel"}}}))
    base = root / "own.base.gguf"
    convert(src, base, ConvertOptions(bits=2, group_size=32, plan=str(plan), grid_offset=0.5,
                                      scale_delta=0.1, progress=False))
    own = set_replica_params(base, root / "own.gguf", {
        "blk.0.attn_q.lrq_r1.gain": np.full(64, 1.1, np.float32),
        "blk.0.attn_q.lrq_r1.bias": np.full(64, 0.01, np.float32),
        "blk.2.attn_v.lrq_r1.act": np.array([0.9, 8], np.float32)})
    return {"plain": src.read_bytes(), "own": own.read_bytes()}


def _known(sig: str) -> bool:
    return sig.rsplit(":", 1)[0] in KNOWN


# ---- byte-level edits of a GGUF (the corruptions and reproducers; no writer involved) ----------

def _value_at(data: bytes, key: str) -> int:
    """Offset of the value type (u32) of ``key`` in the key/value section."""
    k = key.encode()
    i = data.find(struct.pack("<Q", len(k)) + k)
    assert i > 0, key
    return i + 8 + len(k)


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def _set_u32_key(data: bytes, key: str, value: int) -> bytes:
    at = _value_at(data, key)
    assert struct.unpack_from("<I", data, at)[0] == 4, key          # GGUF uint32
    return _patch(data, at + 4, struct.pack("<I", value))


def _set_array_u32(data: bytes, key: str, index: int, value: int) -> bytes:
    at = _value_at(data, key)
    assert struct.unpack_from("<II", data, at) == (9, 4), key       # array of uint32
    return _patch(data, at + 16 + 4 * index, struct.pack("<I", value))


def _set_string_byte(data: bytes, key: str, value: int) -> bytes:
    """First byte of string key ``key`` replaced (e.g. by 0xff: not UTF-8)."""
    at = _value_at(data, key)
    assert struct.unpack_from("<I", data, at)[0] == 8, key          # GGUF string
    assert struct.unpack_from("<Q", data, at + 4)[0] > 0, key
    return _patch(data, at + 12, bytes([value]))


def _set_tensor_f32(data: bytes, name: str, index: int, value: float, tmp: Path) -> bytes:
    """Element ``index`` of F32 tensor ``name`` set to ``value`` (offsets from lrq.gguf_meta)."""
    from lrq.gguf_meta import read_metadata
    tmp.write_bytes(data)
    infos = {n: (t, off) for n, _, t, off in read_metadata(tmp)["GGUF.tensor_infos"]}
    ttype, off = infos[name]
    assert ttype == 0, name                                          # ggml F32
    return _patch(data, off + 4 * index, struct.pack("<f", value))


CORRUPTIONS = {
    "truncated-header": lambda d: d[:20],
    "truncated-keys": lambda d: d[:600],
    "truncated-tensor-data": lambda d: d[:len(d) - 100],
    "bad-magic": lambda d: b"GGUX" + d[4:],
    "gguf-version-99": lambda d: _patch(d, 4, struct.pack("<I", 99)),
    "lrq-format-version-7": lambda d: _set_u32_key(d, Keys.FORMAT_VERSION, 7),
    "schedule-layer-out-of-range": lambda d: _set_array_u32(d, Keys.SCHEDULE_LAYER, 1, 1000),
    "group-size-48": lambda d: _set_u32_key(d, Keys.GROUP_SIZE, 48),
    # lrq.format_version retyped as int32 (type id 5): rule K1
    "format-version-int32": lambda d: _patch(d, _value_at(d, Keys.FORMAT_VERSION), struct.pack("<I", 5)),
    "n-kv-huge": lambda d: _patch(d, 16, struct.pack("<Q", 1 << 40)),
}


def test_seeds_are_accepted_by_every_reader(seeds, tmp_path):
    for name, data in seeds.items():
        got = target.run_one(data, tmp_path / f"{name}.gguf")
        assert all(got.values()), (name, got)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_seed_is_refused_with_the_readers_errors(name, seeds, tmp_path):
    bad = CORRUPTIONS[name](seeds["own"])
    assert bad != seeds["own"]
    got = target.run_one(bad, tmp_path / "bad.gguf")     # raises Finding on any other exception
    assert got["open_model"] is False, (name, got)


def _mutate(rng: random.Random, data: bytes, words: list[bytes]) -> bytes:
    """One libFuzzer-like mutation: mostly byte changes in the first 8 KB (header, keys, tensor
    table: what the readers interpret), else a dictionary word spliced in, or a truncation."""
    d = bytearray(data)
    op = rng.random()
    if op < 0.6:
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(min(len(d), 8192))] = rng.choice((0, 1, 0x7f, 0x80, 0xff, rng.randrange(256)))
    elif op < 0.9:
        at = rng.randrange(min(len(d), 8192))
        w = rng.choice(words)
        d[at:at + (len(w) if rng.random() < 0.5 else 0)] = w
    else:
        del d[rng.randrange(len(d)):]
    return bytes(d)


def test_mutated_seeds_raise_only_the_readers_errors(seeds, tmp_path):
    words = [k.encode() for k in Keys.all().values()] + [struct.pack("<I", v) for v in range(13)] \
        + [struct.pack("<Q", v) for v in (0, 1, 1 << 32, (1 << 64) - 1)]
    rng = random.Random(0)
    found, outcomes = {}, {"accepted": 0, "refused": 0}
    items = sorted(seeds.items())
    for i in range(N_MUTATIONS):
        name, data = items[i % len(items)]
        bad = _mutate(rng, data, words)
        try:
            got = target.run_one(bad, tmp_path / "m.gguf")
        except target.Finding as f:
            found.setdefault(f.signature, f.trace)
            continue
        outcomes["accepted" if got["open_model"] else "refused"] += 1
    unknown = {s: t for s, t in found.items() if not _known(s)}
    assert not unknown, "\n\n".join(f"{s}\n{t}" for s, t in unknown.items())
    # the mutations reach both verdicts (a mutator that only breaks the magic would not)
    assert outcomes["accepted"] > 0 and outcomes["refused"] > 0, outcomes


# ---- the campaigns' findings: a minimal reproducer each (all fixed now) ---------------------------

# Fuzz finding (fixed): a string key that was not UTF-8 made LRQModelFile raise UnicodeDecodeError
# from gguf-py's ReaderField.contents().  gguf and llama.cpp take any bytes as a string, so the
# readers now accept it (lrq.gguf_hparams.read_field).
def test_non_utf8_string_key_is_accepted_by_every_reader(seeds, tmp_path):
    odd = _set_string_byte(seeds["own"], "general.name", 0xFF)
    got = target.run_one(odd, tmp_path / "odd.gguf")     # raises Finding on UnicodeDecodeError
    assert all(got.values()), got


# Fuzz finding (fixed): activation bits of NaN in a replica's act tensor made LRQModelFile's int(k)
# raise ValueError (+inf: OverflowError) instead of an LRQFileError; the C++ loader refused both.
@pytest.mark.parametrize("bits", [float("nan"), float("inf")])
def test_non_finite_act_bits_are_refused_with_a_reader_error(bits, seeds, tmp_path):
    bad = _set_tensor_f32(seeds["own"], "blk.2.attn_v.lrq_r1.act", 1, bits, tmp_path / "src.gguf")
    got = target.run_one(bad, tmp_path / "bad.gguf")
    assert got["open_model"] is False


def _tensor_type_at(data: bytes, name: str) -> int:
    """Offset of the ggml type (u32) of tensor ``name`` in the tensor table."""
    n = name.encode()
    i = data.find(struct.pack("<Q", len(n)) + n)
    assert i > 0, name
    at = i + 8 + len(n)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


# The libFuzzer run's one sanitizer report (docs/RESULTS.md "Fuzzing"): llama.cpp's gguf.cpp loads
# a value type / tensor type read from the file into an enum before range-checking it (UBSan
# "load of value ..., which is not a valid value for type 'gguf_type'"; suppressed there by
# bench/fuzz/ubsan.supp).  Harmless in the real build: the file is refused.  This is that check
# on the release loader, where it can run (a crash or an accepted file fails it).
INVALID_TYPE_IDS = {
    "kv-type-out-of-range": lambda d: _patch(d, _value_at(d, "general.architecture"), struct.pack("<I", 0x7366_5f5f)),
    "tensor-type-out-of-range": lambda d: _patch(d, _tensor_type_at(d, "blk.0.attn_q.weight"), struct.pack("<I", 1000)),
}


# what gguf.cpp says about each (the refusal is for the type, not some other damage)
INVALID_TYPE_MESSAGE = {"kv-type-out-of-range": "general.architecture' has invalid GGUF type",
                        "tensor-type-out-of-range": "blk.0.attn_q.weight' has invalid ggml type"}


@pytest.mark.parametrize("name", sorted(INVALID_TYPE_IDS))
def test_cpp_loader_refuses_invalid_type_ids(name, seeds, tmp_path):
    from lrq import _native
    good = tmp_path / "good.gguf"
    good.write_bytes(seeds["own"])
    _native.Model(str(good), n_ctx=32, n_threads=1)    # the control: a broken build fails here
    bad = tmp_path / f"{name}.gguf"
    bad.write_bytes(INVALID_TYPE_IDS[name](seeds["own"]))
    with pytest.raises(_native.LoadError, match=INVALID_TYPE_MESSAGE[name]):
        _native.Model(str(bad), n_ctx=32, n_threads=1)
    # and the Python readers agree
    assert target.run_one(bad.read_bytes(), tmp_path / "py.gguf")["open_model"] is False


def _duplicate_token(data: bytes) -> bytes:
    """tokenizer.ggml.tokens with one token's string replaced by an earlier token of the same
    length: two ids for one string."""
    at = _value_at(data, "tokenizer.ggml.tokens")
    assert struct.unpack_from("<II", data, at) == (9, 8)            # array of strings
    n = struct.unpack_from("<Q", data, at + 8)[0]
    pos, first_of_len = at + 16, {}
    for _ in range(n):
        ln = struct.unpack_from("<Q", data, pos)[0]
        if ln in first_of_len and ln > 0:
            return _patch(data, pos + 8, data[first_of_len[ln]:first_of_len[ln] + ln])
        first_of_len.setdefault(ln, pos + 8)
        pos += 8 + ln
    raise AssertionError("no two tokens of one length")


# Run in a child: the failure this guards against is an abort, which would take pytest down.
_LOAD_IN_CHILD = """
import sys
from lrq import _native
try:
    _native.Model(sys.argv[1], n_ctx=32, n_threads=1)
except _native.LoadError as e:
    print(e)
    sys.exit(3)
sys.exit(0)
"""


# Fuzz finding (fixed): a vocabulary with a repeated token string aborted the process in llama.cpp's
# vocab loader, GGML_ASSERT(id_to_token.size() == token_to_id.size()) (src/llama-vocab.cpp,
# llama_vocab::impl::load), in every tool and in the binding; the loader hook now refuses it.
def test_cpp_loader_refuses_a_repeated_token(seeds, tmp_path):
    def load(data: bytes, name: str) -> subprocess.CompletedProcess:
        path = tmp_path / name
        path.write_bytes(data)
        return subprocess.run([sys.executable, "-c", _LOAD_IN_CHILD, str(path)], capture_output=True,
                              text=True, timeout=120)

    # the control loads in the same kind of child: a broken build (no backend, a library being
    # rebuilt) fails here with its own message, never taken for a refusal of the bad file
    good = load(seeds["own"], "good.gguf")
    if good.returncode != 0:
        pytest.fail(f"the unmodified file does not load (exit {good.returncode}): {good.stdout[-500:]}"
                    f"{good.stderr[-1500:]}")
    proc = load(_duplicate_token(seeds["own"]), "dup-token.gguf")
    # 3: refused with _native.LoadError; a negative code is a signal (SIGABRT from the assert)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert "dup-token.gguf" in proc.stdout and "token" in proc.stdout.replace("dup-token.gguf", ""), proc.stdout


def test_atheris_harness_runs(seeds, tmp_path):
    import atheris  # noqa: F401  (a dev dependency: a missing one fails here, it does not skip)
    corpus = tmp_path / "seeds"
    corpus.mkdir()
    for name, data in seeds.items():
        (corpus / f"{name}.gguf").write_bytes(data)
    findings = tmp_path / "findings"
    (tmp_path / "corpus-new").mkdir()
    proc = subprocess.run([sys.executable, str(FUZZ / "run.py"), "_atheris", "--findings", str(findings), "--",
                           "-atheris_runs=100", "-seed=1", str(tmp_path / "corpus-new"), str(corpus)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    target.sweep_stale()      # the worker's input file (libFuzzer exits without clean-up)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Done 100" in out, out[-3000:]
    counts = json.loads((findings / "counts.json").read_text()) if (findings / "counts.json").is_file() else {}
    assert all(_known(s) for s in counts), counts
