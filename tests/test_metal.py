"""The Metal kernels of metal/lrq.metal, run on the CPU, against the C reference.

No Mac or Metal compiler is reachable here, so tests/metal/harness.cpp compiles the real shader
source with g++ through a shim (tests/metal/shim/metal_stdlib: address-space words defined away,
half = _Float16, 32-lane simdgroups of std::threads with simd_sum / simd_max / threadgroup barriers,
simdgroup 8x8 matrices copied to every lane) and runs every kernel over a simulated grid. Each case
compares the kernel's output with lrq_mul_mat_ref (native/lrq/ref.c: FORMAT.md section 6 in float64,
itself checked against lrq.quant by tests/test_kernels.py):

- every bits x mode (1-4 asym / sym, ternary) x group size (32..256) on n_in = 352, which leaves a
  short last group for g = 64, 128, 256;
- the mat-vec kernel (1 token), the few-column kernels (2, 3 -> the 4-column kernel with a masked
  column, 8, 11 -> two column blocks) and the tiled mat-mat kernel (40 tokens; 37 and 100 rows);
  37 rows is a multiple of neither the rows per simdgroup (4) nor per threadgroup (8, 64); and
  model-sized rows (n_in 1536, 130 rows; 1 and 69 tokens) for every bits x mode;
- replica parameters cycled over the cases: none, alpha / beta per group, per row and per tensor,
  gain, bias, activation clip, 4- and 8-bit activations;
- padded code rows and activation rows (NaN padding), absent sources as NULL pointers, output
  guard elements, threadgroup memory filled with NaN before each threadgroup.

Controls: broken copies of the kernels (one character changed per kernel) must fail every case, a
ThreadSanitizer build must report nothing, and the same build must report the race of a copy
without one of its threadgroup barriers.  The ops that replicas of stock-typed weights and adapters
add to a graph are checked against the pinned ggml-metal's supports_op.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# loaded by path under its own name: `build` is also PyPA's package and other tests' helpers
_spec = importlib.util.spec_from_file_location("lrq_metal_build", ROOT / "tests" / "metal" / "build.py")
harness_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness_build)

CACHE = Path(tempfile.gettempdir()) / "lrq-metal-harness"

# Float32 kernels against the float64 reference: products and sums rounded to float32 (relative
# error ~2^-24 per operation over 352 or 1536 terms) and half parameters read exactly; measured
# NMSE 1.1e-14 .. 5.3e-13 over the 270 cases.  1e-10 leaves two orders of margin, and one wrong
# code among the 37 x 352 weights of a case (error d * x in one output of ~sqrt(352) * d * x) is an
# NMSE of ~1e-4: any real decoding, group or parameter error is far outside.
METAL_NMSE_TOL = 1e-10
# A broken control must be wrong by more than this in every case (measured: 0.048 .. 83).
BROKEN_NMSE_MIN = 1e-6

N_MODES_BITS, N_GROUPS, N_KCONFS = 9, 4, 7
N_BIG = 2   # per bits x mode: model-sized rows (n_in 1536, 130 rows), mat-vec and 69-token mat-mat
N_CASES = N_MODES_BITS * N_GROUPS * N_KCONFS + N_MODES_BITS * N_BIG
KERNEL_FAMILIES = {"mv_c1", "mv_c2", "mv_c4", "mv_c8", "mm"}
REPLICA_KINDS = {"none", "group", "row", "tensor_clip", "act4", "act8_group"}
HARNESS_TIMEOUT_S = 240   # a kernel with unbalanced barriers hangs the emulation: fail, not hang

CASE = re.compile(r"^case (.*)$")

# One-character bugs (old, new): the sign of the offset term of each kernel; a wrong weight index
# in each kernel's decoding.  Every case must fail with them.
MUTANTS = {
    "offset_sign": [("acc[r][c] += ad * sq + off * sx[c];", "acc[r][c] += ad * sq - off * sx[c];"),
                    ("lrq_dq_code(blk, BITS, ah * 16 + j) + off;", "lrq_dq_code(blk, BITS, ah * 16 + j) - off;")],
    "code_index": [("q[j] = (float) lrq_dq_code(blk, BITS, il * 8 + j);", "q[j] = (float) lrq_dq_code(blk, BITS, il * 9 + j);"),
                   ("lrq_dq_code(blk, BITS, ah * 16 + j) + off;", "lrq_dq_code(blk, BITS, ah * 18 + j) + off;")],
}
# The barrier between filling the tiles and reading them in kernel_lrq_mul_mm.
NO_BARRIER = [("            sb[(bp * 8 + j) * NT + bt] = v;\n        }\n        threadgroup_barrier(mem_flags::mem_threadgroup);\n",
               "            sb[(bp * 8 + j) * NT + bt] = v;\n        }\n")]


def _parse(stdout: str) -> list[dict]:
    cases = []
    for line in stdout.splitlines():
        m = CASE.match(line)
        if m:
            fields = dict(kv.split("=", 1) for kv in m.group(1).split())
            fields["nmse"] = float(fields["nmse"])   # "nan" / "-nan" parse as NaN
            cases.append(fields)
    return cases


def _run(exe: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=HARNESS_TIMEOUT_S, env=env)


@pytest.fixture(scope="module")
def harness() -> Path:
    return harness_build.build(CACHE)


@pytest.fixture(scope="module")
def cases(harness) -> list[dict]:
    r = _run(harness)
    assert r.returncode == 0, r.stderr
    return _parse(r.stdout)


def test_harness_covers_every_type_group_kernel_and_replica(cases):
    assert len(cases) == N_CASES
    combos = {(c["kernel"], c["mode"], c["bits"], c["g"]) for c in cases}
    assert len(combos) == len(KERNEL_FAMILIES) * N_MODES_BITS * N_GROUPS
    assert {c["kernel"] for c in cases} == KERNEL_FAMILIES
    for k in KERNEL_FAMILIES:
        assert {c["rep"] for c in cases if c["kernel"] == k} == REPLICA_KINDS, k
    assert {c["n_tok"] for c in cases} == {"1", "2", "3", "8", "11", "40", "69"}
    assert all(float(c["power"]) > 0 for c in cases)   # a reference that is not all zero


def test_kernels_match_reference(cases):
    bad = [c for c in cases if not (c["nmse"] <= METAL_NMSE_TOL) or c["ok_guard"] != "1"]
    assert not bad, f"{len(bad)} of {len(cases)} cases fail, first: {bad[0]}"


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_broken_kernel_fails_every_case(name):
    exe = harness_build.build(CACHE, mutations=MUTANTS[name])
    r = _run(exe, "--no-big")   # the 252 cases of every type x group x kernel configuration
    assert r.returncode == 0, r.stderr
    cases = _parse(r.stdout)
    assert len(cases) == N_MODES_BITS * N_GROUPS * N_KCONFS
    passing = [c for c in cases if c["nmse"] <= BROKEN_NMSE_MIN]
    assert not passing, f"{name}: {len(passing)} cases pass with the broken kernel, first: {passing[0]}"


def _tsan_env():
    env = dict(os.environ)
    env["TSAN_OPTIONS"] = "halt_on_error=0 exitcode=66 report_signal_unsafe=0"
    return env


def test_threadsanitizer_reports_nothing():
    exe = harness_build.build(CACHE, tsan=True)
    r = _run(exe, "--quick", "--concurrent", "3", env=_tsan_env())
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0, r.stderr[-4000:]
    cases = _parse(r.stdout)
    assert {c["kernel"] for c in cases} == {"mv_c1", "mv_c4", "mm"}
    assert all(c["nmse"] <= METAL_NMSE_TOL for c in cases)


def test_threadsanitizer_sees_a_missing_barrier():
    exe = harness_build.build(CACHE, tsan=True, mutations=NO_BARRIER)
    r = _run(exe, "--quick", env=_tsan_env())
    assert r.returncode == 66 and "ThreadSanitizer: data race" in r.stderr


# ---- kernel names: the shader source and the host's dispatch (patches/0007) agree ---------------

def test_host_names_match_the_patch():
    source = harness_build.METAL_SOURCE.read_text()
    names = set(re.findall(r'host_name\("(kernel_lrq_[a-z0-9_]+)"\)', source))
    expected = {f"kernel_lrq_mul_mv_b{b}_c{c}" for b in (1, 2, 3, 4) for c in (1, 2, 4, 8)}
    expected |= {f"kernel_lrq_mul_mm_b{b}" for b in (1, 2, 3, 4)}
    assert names == expected
    patch = next(iter(sorted((ROOT / "patches").glob("0007-*.patch"))), None)
    assert patch is not None, "patches/0007-*.patch (Metal wiring) is missing"
    text = patch.read_text()
    # the host builds the names with these formats
    assert '"kernel_lrq_mul_mv_b%d_c%d"' in text and '"kernel_lrq_mul_mm_b%d"' in text


# ---- stock-typed bases and adapters on Metal (deliverable 5) ----------------------------------------

METAL_DEVICE_M = ROOT / "build" / "llama.cpp" / "ggml" / "src" / "ggml-metal" / "ggml-metal-device.m"
LRQ_GRAPH = ROOT / "native" / "lrq" / "lrq-llama.cpp"

# Every ggml graph constructor lrq's graph code (native/lrq/lrq-llama.cpp) calls, the op it builds,
# the shapes lrq gives it, and the return statement of the pinned ggml-metal's supports_op for that
# op, which must hold for those shapes.  A new call in lrq-llama.cpp fails the test until it is
# added here (and checked on Metal); a new llama.cpp pin that changes a condition fails it too.
LRQ_OPS = {
    "mul_mat": ("GGML_OP_MUL_MAT",
                # stock weight (any llama-quantize type) x F32 activations; low-rank lr_v / lr_u F16 or
                # Q8_0 x F32: src1 is F32, so only NVFP4 / TQ1_0 bases would be refused
                "return ggml_metal_supports_mul_mat_op( has_simdgroup_reduction, op, true, ggml_metal_op_mul_mat_use_mm(op, has_simdgroup_mm));"),
    "clamp": ("GGML_OP_CLAMP",
              # clip of a stock-typed replica: F32 activations with contiguous rows
              "return ggml_is_contiguous_rows(op->src[0]) && (op->src[0]->type == GGML_TYPE_F32 || op->src[0]->type == GGML_TYPE_F16);"),
    "scale": ("GGML_OP_SCALE",
              # weight of a parallel-group member: F32 [n_embd, t], contiguous
              "return ggml_is_contiguous_rows(op->src[0]) && (op->src[0]->type == GGML_TYPE_F32 || op->src[0]->type == GGML_TYPE_F16);"),
    # gain / bias F32 [n_out] broadcast over [n_out, t] (binbcast: i10 = i0 % ne10, rows repeat);
    # low-rank add and group sums: same-shape F32
    "mul": ("GGML_OP_MUL",
            "return ggml_is_contiguous_rows(op->src[0]) && ggml_is_contiguous_rows(op->src[1]) && (op->src[0]->type == GGML_TYPE_F32 || op->src[0]->type == GGML_TYPE_F16) && (op->src[0]->type == op->src[1]->type);"),
    "add": ("GGML_OP_ADD",
            "return ggml_is_contiguous_rows(op->src[0]) && ggml_is_contiguous_rows(op->src[1]) && (op->src[0]->type == GGML_TYPE_F32 || op->src[0]->type == GGML_TYPE_F16) && (op->src[0]->type == op->src[1]->type);"),
    "sub": ("GGML_OP_SUB",
            "return ggml_is_contiguous_rows(op->src[0]) && ggml_is_contiguous_rows(op->src[1]) && (op->src[0]->type == GGML_TYPE_F32 || op->src[0]->type == GGML_TYPE_F16) && (op->src[0]->type == op->src[1]->type);"),
    "get_rows": ("GGML_OP_GET_ROWS",
                 # output rows of the saved group input: F32 rows, I32 ids
                 "return op->src[0]->type != GGML_TYPE_NVFP4 && op->src[0]->type != GGML_TYPE_TQ1_0;"),
    "cont": ("GGML_OP_CONT", None),   # F32 -> F32, before the LRQ op only: the nested type switch below
    # expert replicas of a MoE layer (format v4, docs/moe.md): the replica's products on the
    # routed slots, its SwiGLU, the per-entry weights as an input tensor, ids reshaped; the
    # skipping variant's F32 -> I32 id map (ggml_cast) is built for CPU-only machines, and
    # Metal's CPY case takes F32 -> I32 too
    "mul_mat_id": ("GGML_OP_MUL_MAT_ID",
                   "return ggml_metal_supports_mul_mat_op( has_simdgroup_reduction, op, false, ggml_metal_op_mul_mat_id_use_mm(op, has_simdgroup_mm));"),
    "swiglu_split": ("GGML_OP_GLU", None),     # the GLU switch below: SWIGLU on contiguous F32 rows
    "cast": ("GGML_OP_CPY", None),
    "new_tensor_2d": ("GGML_OP_NONE", "return true;"),
    "reshape_1d": ("GGML_OP_RESHAPE", "return true;"),
    "reshape_2d": ("GGML_OP_RESHAPE", "return true;"),
    "reshape_3d": ("GGML_OP_RESHAPE", "return true;"),
    "lrq_mul_mat": ("GGML_OP_LRQ_MUL_MAT", None),   # lrq's own op: metal/lrq.metal, patches/0007
    # the same op with the two-level layout's source (format v4): Metal declines it (patches/0007)
    "lrq_mul_mat_two_level": ("GGML_OP_LRQ_MUL_MAT", None),
}
GRAPH_CALL = re.compile(r"\bggml_([a-z_0-9]+)\(\s*ctx0?\s*,")


def _supports_op_cases() -> dict[str, str]:
    """op -> the whitespace-normalised text of its case in supports_op (labels that share a body
    share it; the body runs to the next GGML_OP_ label)."""
    text = METAL_DEVICE_M.read_text()
    start = text.index("bool ggml_metal_device_supports_op(")
    body = text[start:text.index("\nconst struct ggml_metal_device_props *", start)]
    parts = re.split(r"case (GGML_OP_[A-Z0-9_]+):", body)
    out, pending = {}, []
    for i in range(1, len(parts), 2):
        pending.append(parts[i])
        stmt = " ".join(parts[i + 1].split())
        if stmt:
            for op in pending:
                out[op] = stmt
            pending = []
    return out


def test_lrq_graph_ops_are_the_listed_ones():
    called = set(GRAPH_CALL.findall(LRQ_GRAPH.read_text()))
    assert called == set(LRQ_OPS), f"ops in {LRQ_GRAPH.name} not in LRQ_OPS: {called - set(LRQ_OPS)}; listed but unused: {set(LRQ_OPS) - called}"


def test_pinned_ggml_metal_supports_the_stock_ops_lrq_adds():
    cases = _supports_op_cases()
    for fn, (op, expected) in LRQ_OPS.items():
        if op == "GGML_OP_LRQ_MUL_MAT":
            continue
        assert op in cases, f"{op} ({fn}) is not a case of ggml_metal_device_supports_op"
        if expected is not None:
            assert " ".join(expected.split()) in cases[op], f"{op}: {cases[op]}"
    # MUL_MAT: lrq's src1 is F32 (the FWHT branch before it needs an F16 src1), for which
    # ggml_metal_supports_mul_mat_op is true unless src0 is NVFP4 / TQ1_0
    text = METAL_DEVICE_M.read_text()
    helper = text[text.index("static bool ggml_metal_supports_mul_mat_op("):text.index("bool ggml_metal_device_supports_op(")]
    helper = " ".join(helper.split())
    assert "if (op->src[1]->type != GGML_TYPE_F16) { return true; }" in helper
    assert "op->src[0]->type == GGML_TYPE_NVFP4 || op->src[0]->type == GGML_TYPE_TQ1_0) { return false; }" in helper
    # CONT F32 -> F32: the first inner case of the copy switch, whose first return is true
    cont = cases["GGML_OP_CONT"]
    head = "{ switch (op->src[0]->type) { case GGML_TYPE_F32: switch (op->type) { case GGML_TYPE_F32:"
    assert cont.startswith(head), cont[:200]
    # CPY F32 -> I32 (the expert replicas' id map): in the F32 source's inner switch, before its default
    cpy = cases["GGML_OP_CPY"]
    f32 = cpy[cpy.index("case GGML_TYPE_F32: switch (op->type) {"):]
    assert "case GGML_TYPE_I32: return true;" in f32[:f32.index("default:")], f32[:400]
    # GLU: SWIGLU on contiguous F32 rows
    glu = cases["GGML_OP_GLU"]
    assert "case GGML_GLU_OP_SWIGLU:" in glu and "op->src[0]->type == GGML_TYPE_F32" in glu, glu
    assert cont[len(head):].split("return", 1)[1].startswith(" true;")


# ---- the library string the patched ggml-metal compiles at run time ---------------------------------

def _cmake() -> str:
    import shutil
    exe = shutil.which("cmake") or str(ROOT / ".venv" / "bin" / "cmake")
    assert Path(exe).exists(), "cmake not found (make build installs it)"
    return exe


def test_embedded_library_source_compiles_through_the_shim(tmp_path):
    patch = next(iter(sorted((ROOT / "patches").glob("0007-*.patch"))))
    block = patch.read_text().split("set(LRQ_METAL_SOURCES", 1)[1].split(")", 1)[0]
    rel = re.findall(r'"\$\{LRQ_METAL_DIR\}/([^"]+)"', block)
    sources = [(ROOT / "metal" / r).resolve() for r in rel]
    assert [s.name for s in sources] == ["lrq-dequant.h", "lrq-kargs.h", "lrq.metal"]
    assert all(s.exists() for s in sources)
    out = tmp_path / "lrq-metal-source.inc"
    subprocess.run([_cmake(), f"-DOUT={out}", "-DSOURCES=" + ";".join(map(str, sources)), "-P",
                    str(ROOT / "metal" / "embed.cmake")], check=True, capture_output=True)
    # ggml-metal-device.m is Objective-C (C, no raw strings): the .inc must be a valid C literal;
    # a C program that includes it gives back the string the Metal compiler gets
    dump = tmp_path / "dump.c"
    dump.write_text('#include <stdio.h>\n#include "lrq-metal-source.inc"\n'
                    "int main(void) { fputs(ggml_metal_lrq_source, stdout); return 0; }\n")
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-I", str(tmp_path), str(dump), "-o", str(tmp_path / "dump")],
                   check=True)
    body = subprocess.run([str(tmp_path / "dump")], capture_output=True, text=True, check=True).stdout
    for s in sources:   # every line of every source is in it
        assert all(line in body for line in s.read_text().splitlines() if not line.startswith(("#include \"lrq-", "#pragma once")))
    assert '#include "' not in body   # one self-contained string: nothing to find at run time
    src = tmp_path / "embedded.metal"
    src.write_text(harness_build.ATTRIBUTE.sub("", body))
    r = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", "-Wno-attributes", "-I",
                        str(ROOT / "tests" / "metal" / "shim"), "-x", "c++", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# ---- the device check of the macOS workflow, run here on the CPU backend ----------------------------

def test_backend_check_runs_the_op_on_every_device(tmp_path):
    """tests/metal/backend_check.cpp (.github/workflows/metal.yml runs it on Metal) on this build:
    the CPU backend must run every case within the bound; --require-gpu fails without a GPU."""
    bin_dir = ROOT / "build" / "cmake" / "bin"
    inc = ["-I", str(ROOT / "build" / "llama.cpp" / "ggml" / "include"), "-I", str(ROOT / "native" / "include")]
    subprocess.run(["gcc", "-std=c11", "-O2", "-ffp-contract=off", *inc, "-c", str(ROOT / "native" / "lrq" / "ref.c"),
                    "-o", str(tmp_path / "ref.o")], check=True)
    exe = tmp_path / "backend_check"
    subprocess.run(["g++", "-std=c++17", "-O2", *inc, str(ROOT / "tests" / "metal" / "backend_check.cpp"),
                    str(tmp_path / "ref.o"), f"-L{bin_dir}", "-lggml", "-lggml-base", f"-Wl,-rpath,{bin_dir}",
                    "-o", str(exe)], check=True)
    r = subprocess.run([str(exe), str(bin_dir), "--require-gpu"], capture_output=True, text=True, timeout=120)
    lines = [dict(kv.split("=", 1) for kv in ln.split() if "=" in kv) for ln in r.stdout.splitlines() if ln.startswith("device=")]
    cpu = [ln for ln in lines if ln["device"] == "CPU"]
    assert len(cpu) == N_MODES_BITS * N_GROUPS * 4
    assert all(ln["supported"] == "1" and float(ln["nmse"]) <= 1e-8 for ln in cpu)
    gpu_ran = int(re.search(r"gpu cases run: (\d+)", r.stdout).group(1))
    assert r.returncode == (0 if gpu_ran else 1), r.stdout[-2000:] + r.stderr[-2000:]
