"""Portable x86-64 binaries: the same build runs on CPUs without AVX and on the host.

The CPU backend is built once per instruction-set level (libggml-cpu-<variant>.so, CMakeLists.txt)
and ggml_backend_load_best() loads the best one the CPU supports; lrq's kernels are built for the
x86-64 baseline and pick AVX2 at run time.  llama-completion runs a tiny LRQ model greedily under
`qemu-x86_64 -cpu <model>` (qemu64: no SSE4.2; Westmere: SSE4.2, no AVX; SandyBridge: AVX, no
AVX2; Haswell: AVX2) and natively.  A plain GGML_NATIVE=OFF build (one AVX2 backend) dies under
Westmere with SIGILL at `llama backend init`.  Checked, each against an independent reference:
- every run exits 0 and prints the host's greedy text;
- the variant each run loaded (ggml's "loaded CPU backend from" line) and the SIMD features it
  reports (llama.cpp's system_info line) are the ones of the CPU: the emulated model's (table
  below) or the host's /proc/cpuinfo;
- the LRQ kernel that ran (system_info's LRQ_KERNELS, patches/0005): "generic" without AVX2,
  "avx2" with AVX2 + FMA + F16C, "avx512+avx2" where the CPU also has AVX-512 VNNI (LRQ2, single-level and two-level);
- with the op's reference arithmetic (LRQ_CPU_REF=1) the perplexity under Westmere is the host's
  up to float rounding.
The binding loads the same modules (module.cpp): its system_info names the host's variant too.

`make test` (testdeps) installs qemu-user, which has qemu-x86_64; a missing qemu fails, not skips.
"""

from __future__ import annotations

import os
import platform
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lrq import tools
from lrq.convert import ConvertOptions, convert

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="the CPU backend variants are built on x86-64 hosts only")

QEMU = "qemu-x86_64"
PROMPT = "the old man said"
N_PREDICT = 8
RUN_TIMEOUT_S = 300       # each emulated run takes about a second; the margin is for a busy machine

# qemu CPU model -> (the variant ggml must load, the SIMD features that variant reports, the LRQ
# kernel).  The best variant, not just a runnable one: Westmere must get sse42, not x64.
EMULATED = {
    "qemu64": ("x64", set(), "generic"),
    "Westmere": ("sse42", set(), "generic"),
    "SandyBridge": ("sandybridge", {"AVX"}, "generic"),
    "Haswell": ("haswell", {"AVX", "AVX2", "F16C", "FMA", "BMI2"}, "avx2"),
}
QEMU_AVX = (7, 2)         # qemu's TCG emulates AVX / AVX2 from 7.2 on

# system_info feature names of ggml's CPU backend -> /proc/cpuinfo flags
CPUINFO_FLAG = {"AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
                "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
                "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8"}
LRQ_AVX2_FLAGS = {"avx2", "fma", "f16c"}   # lrq_kernels_simd()'s run-time check (q8.c)
LRQ_AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}   # its AVX-512 check

# Perplexity with LRQ_CPU_REF=1 (float activations, double sums in the op), host vs Westmere:
# measured 568.9540 vs 568.9539 (2e-7), float summation order in ggml's SSE vs AVX-512 code.
# An op or variant that computed something else (a replica's parameters ignored, a kernel
# dropping a block) moves a tiny random model's perplexity by far more than 1e-5.  (The int8
# fast path is not compared this way: an activation rounding flipped by a 1e-7 difference moves
# it by up to 0.13 %, measured, so it is checked through the greedy text.)
REF_PPL_RTOL = 1e-5


def _qemu() -> str:
    qemu = shutil.which(QEMU)
    assert qemu, f"{QEMU} not found: run `make testdeps` (installs qemu-user)"
    return qemu


def _qemu_version() -> tuple[int, int]:
    out = subprocess.run([_qemu(), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def _run(tool: str, args: list, qemu_cpu: str | None, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(tools.tool(tool)), *map(str, args)]
    if qemu_cpu:
        cmd = [_qemu(), "-cpu", qemu_cpu, *cmd]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=env)


def _complete(model: Path, qemu_cpu: str | None) -> subprocess.CompletedProcess:
    # -v: ggml's "loaded CPU backend from" is an info line that llama-completion shows only then
    return _run("llama-completion", ["-m", model, "-p", PROMPT, "-n", N_PREDICT, "-no-cnv", "--temp", "0",
                                     "-t", "1", "-c", "64", "--no-warmup", "-v"], qemu_cpu)


def _loaded_variant(log: str) -> str:
    m = re.findall(r"loaded CPU backend from (\S+)", log)
    assert len(m) == 1, log[-3000:]
    v = re.fullmatch(r"libggml-cpu-([a-z0-9_.]+)\.so", Path(m[0]).name)
    assert v, m[0]
    return v.group(1)


def _cpu_features(system_info: str) -> dict[str, str]:
    """The CPU backend's part of llama_print_system_info(): "... | CPU : A = 1 | B = 1 | ..."."""
    m = re.search(r"\| CPU : (.*?)(?:\| [A-Z]+ : |$)", system_info, re.M)
    assert m, system_info[-3000:]
    return dict(kv.split(" = ", 1) for kv in (p.strip() for p in m.group(1).split("|")) if kv)


def _simd(feats: dict[str, str]) -> set[str]:
    return {f for f in feats if f in CPUINFO_FLAG}


def _host_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.fail("no flags line in /proc/cpuinfo")


@pytest.fixture(scope="module")
def lrq_model(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("portable") / "tiny-lrq2.gguf"
    convert(tiny_models.gguf("llama"), out, ConvertOptions(bits=2, group_size=32, plan="last-1", progress=False))
    return out


@pytest.fixture(scope="module")
def host_run(lrq_model):
    proc = _complete(lrq_model, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_host_loads_the_best_variant_it_supports(host_run):
    flags = _host_flags()
    feats = _cpu_features(host_run.stderr)
    simd = _simd(feats)
    # nothing above the CPU (that variant would die with SIGILL) ...
    assert all(CPUINFO_FLAG[f] in flags for f in simd), (simd, sorted(flags))
    # ... and not a lower level than the CPU has: an AVX2 host gets an AVX2 variant
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        assert {"AVX", "AVX2", "F16C", "FMA", "BMI2"} <= simd, feats
        assert _loaded_variant(host_run.stderr) not in ("x64", "sse42", "sandybridge", "ivybridge", "piledriver")
    want = "avx2" if LRQ_AVX2_FLAGS <= flags else "generic"
    if want == "avx2" and LRQ_AVX512_FLAGS <= flags and os.environ.get("LRQ_NO_AVX512") != "1":
        want = "avx512+avx2"      # LRQ2 (both layouts) on the AVX-512 VNNI kernel, the rest on AVX2
    assert feats.get("LRQ_KERNELS") == want, feats


@pytest.mark.parametrize("cpu", list(EMULATED))
def test_emulated_cpu_loads_its_variant_and_prints_the_host_text(lrq_model, host_run, cpu):
    variant, simd, kernels = EMULATED[cpu]
    if simd and _qemu_version() < QEMU_AVX:
        pytest.skip(f"qemu {_qemu_version()} cannot emulate AVX (needs {QEMU_AVX})")
    proc = _complete(lrq_model, cpu)
    # a single-backend AVX2 build exits here with -4 (SIGILL) under every model but Haswell
    assert proc.returncode == 0, f"exit {proc.returncode}: " + proc.stderr[-3000:]
    assert _loaded_variant(proc.stderr) == variant
    feats = _cpu_features(proc.stderr)
    assert _simd(feats) == simd, feats
    assert feats.get("LRQ_KERNELS") == kernels, feats
    # the prompt, then N_PREDICT greedy tokens: measured the same on every model for 56 tokens
    assert PROMPT in proc.stdout and len(proc.stdout.strip()) > len(PROMPT), proc.stdout
    assert proc.stdout == host_run.stdout


def test_reference_perplexity_under_westmere_is_the_hosts(lrq_model, tmp_path):
    rng = random.Random(0)
    words = "the old man said that he would go to the school and see the master of the house".split()
    text = tmp_path / "words.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(600)))
    env = dict(os.environ, LRQ_CPU_REF="1")
    args = ["-m", lrq_model, "-f", text, "-c", "64", "-b", "64", "--chunks", "6", "-t", "1"]
    ppl = {}
    for cpu in (None, "Westmere"):
        proc = _run("llama-perplexity", args, cpu, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stderr + proc.stdout)
        assert m, proc.stderr[-3000:]
        ppl[cpu] = float(m.group(1))
    assert ppl[None] == pytest.approx(ppl["Westmere"], rel=REF_PPL_RTOL), ppl


def test_binding_loads_the_variant_of_the_tools(host_run):
    from lrq import _native

    info = _native.version_info()
    assert "CPU" in info["backends"] and "RPC" in info["backends"], info["backends"]
    feats = _cpu_features(info["system_info"])
    assert feats == _cpu_features(host_run.stderr)
    # the op's kernel in the loaded CPU module is the one the binding's own lrq_kernels picks
    assert feats["LRQ_KERNELS"] == _native.kernels.info()["simd"]
