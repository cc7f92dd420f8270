"""Fuzz the LRQ file readers: atheris on the Python readers, libFuzzer on the C++ loader.

    .venv/bin/python bench/fuzz/run.py                       # both, 1e5 executions each
    .venv/bin/python bench/fuzz/run.py --runs 20000 --only py
    .venv/bin/python bench/fuzz/run.py --only cpp --runs 100000 --out out/fuzz

What it does (each step only when needed; a second run reuses the build and the seeds):

1. atheris: imported from the venv, else ``pip install atheris`` into it.
2. clang with libFuzzer: clang-19 (clang 14 cannot build native/lrq/q8.c: its
   ``__builtin_cpu_supports`` does not know "f16c"); as root on Debian it is installed with apt
   (clang-19, libclang-rt-19-dev).
3. build/fuzz: the patched llama.cpp tree and lrq's glue (the same CMakeLists.txt, LRQ_PYTHON=OFF,
   LRQ_CPU_ALL_VARIANTS=OFF: one CPU backend module, not one per instruction-set level; targets
   ``llama`` and ``ggml-cpu`` only) built with clang, ``-fsanitize=address,undefined,fuzzer-no-link``,
   -O1 (UBSan with halt_on_error=1: any report stops the run with its input, except those listed
   in bench/fuzz/ubsan.supp, known reports of the pinned upstream code); then
   bench/fuzz/lrq_load_fuzzer.cpp linked with ``-fsanitize=fuzzer,address,undefined``.  This
   build is slow (~30 min on 2 busy cores): it runs at ``nice 15`` with ``-j`` = --jobs (1).
4. seeds: bench/fuzz/seeds.py (real LRQ files of a tiny model: own codes in three modes,
   stock-typed F32 / Q8_0 bases, a qwen2 file, the plain source) and the dictionary lrq.dict.
5. the fuzzers, each for --runs executions (libFuzzer ``-runs``, atheris ``-atheris_runs``),
   seeded with the same files, with the dictionary, a 30 s per-input timeout.  The C++ target
   is the public ``llama_model_load_from_file`` (CPU, mmap or not); the Python target is
   bench/fuzz/py_target.py (read_metadata, open_model / LRQModelFile + hparams) in keep-going
   mode: each distinct finding (exception type + innermost lrq / gguf-py frame) keeps its first
   input under OUT/findings-py/ and the run goes on.  libFuzzer keeps going too (-fork=1, a crash
   ends only its child process): the crash inputs are left under OUT/crashes-cpp/ and replayed
   to name each.  Fork mode stops after the child job in which the count is reached, so it
   runs somewhat more than --runs (a few thousand more at most).

Prints, per fuzzer: executions, seconds, executions/s, coverage (libFuzzer's final ``cov:``
edges and ``ft:`` features; atheris counts Python bytecode edges the same way), corpus size,
crashes / findings and sanitizer reports, and the load average; OUT/summary.json has the same.
Exit status 0 when neither fuzzer found anything, 1 otherwise, 2 when a step could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FUZZ_BUILD = REPO / "build" / "fuzz"
HARNESS_SRC = HERE / "lrq_load_fuzzer.cpp"
HARNESS_BIN = FUZZ_BUILD / "bin" / "lrq_load_fuzzer"
CLANG_VERSIONS = ("19", "22", "16", "15")      # newest first among Debian's; 14 cannot build q8.c
# UBSan stays recoverable at compile time so that UBSAN_SUPP can silence a known report of the
# pinned upstream code (a non-recoverable check dies even when suppressed); halt_on_error=1 makes
# every other report stop the run with its input, as -fno-sanitize-recover would.
SAN_FLAGS = "-fsanitize=address,undefined,fuzzer-no-link -fno-omit-frame-pointer"
UBSAN_SUPP = HERE / "ubsan.supp"
OPT_FLAGS = "-O1 -gline-tables-only -DNDEBUG"
TIMEOUT_S = 30            # per input; a load of a ~100 KB file takes milliseconds
SAN_ENV = {
    # leaks on the loader's error paths are findings too: leak detection stays on
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:symbolize=1:allocator_may_return_null=0",
    "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:report_error_type=1:suppressions={UBSAN_SUPP}",
}


class StepError(RuntimeError):
    """A set-up step (install, build, seeds) failed; the message says which and why."""


def _log(msg: str) -> None:
    print(f"[fuzz] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list, log: Path | None = None, env: dict | None = None, nice: int = 0) -> None:
    cmd = [str(c) for c in cmd]
    if nice and shutil.which("nice"):
        cmd = ["nice", "-n", str(nice), *cmd]
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    finally:
        if log:
            out.close()
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise StepError(f"{' '.join(cmd[:6])} ... failed (exit {rc}){' (log ' + str(log) + ')' if log else ''}\n{tail}")


# ---- 1. atheris -------------------------------------------------------------------------------

def ensure_atheris() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        _log("installing atheris into the venv (pip)")
        _run([sys.executable, "-m", "pip", "install", "-q", "atheris"])


# ---- 2. clang ---------------------------------------------------------------------------------

def _has_libfuzzer(cc: str) -> bool:
    lib = subprocess.run([cc, "-print-file-name=libclang_rt.fuzzer-x86_64.a"], capture_output=True,
                         text=True).stdout.strip()
    if Path(lib).is_file():
        return True
    rt = subprocess.run([cc, "-print-runtime-dir"], capture_output=True, text=True).stdout.strip()
    return bool(rt) and any(Path(rt).glob("libclang_rt.fuzzer*.a"))


def find_clang() -> tuple[str, str] | None:
    for v in CLANG_VERSIONS:
        cc, cxx = shutil.which(f"clang-{v}"), shutil.which(f"clang++-{v}")
        if cc and cxx and _has_libfuzzer(cc):
            return cc, cxx
    return None


def ensure_clang() -> tuple[str, str]:
    found = find_clang()
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _log("installing clang-19 and libclang-rt-19-dev (apt)")
        _run(["apt-get", "update", "-qq"])
        _run(["apt-get", "install", "-y", "-qq", "clang-19", "libclang-rt-19-dev"])
        found = find_clang()
        if found:
            return found
    raise StepError("no clang with libFuzzer (clang-" + "/".join(CLANG_VERSIONS) + "): install clang-19 and "
                    "libclang-rt-19-dev (Debian/Ubuntu: apt-get install clang-19 libclang-rt-19-dev)")


# ---- 3. the sanitizer build and the harness -----------------------------------------------------

def build_harness(jobs: int, out: Path) -> Path:
    cc, cxx = ensure_clang()
    if not (REPO / "build" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise StepError("build/llama.cpp is missing: run `make build` first (it prepares the patched tree)")
    env = dict(os.environ)
    # one ccache with the main build (Makefile): a rebuild after a loader fix is quick
    env.setdefault("CCACHE_DIR", str(Path.home() / ".cache" / "lrq" / "ccache"))
    env.setdefault("CCACHE_BASEDIR", str(REPO))
    env.setdefault("CCACHE_NOHASHDIR", "1")
    out.mkdir(parents=True, exist_ok=True)
    cache = FUZZ_BUILD / "CMakeCache.txt"
    text = cache.read_text() if cache.is_file() else ""
    def cached(key: str, value: str) -> bool:   # the entry's type varies (STRING, UNINITIALIZED)
        return re.search(rf"^{key}:\w+={re.escape(value)}$", text, re.M) is not None

    if not cached("CMAKE_CXX_COMPILER", cxx) or not cached("CMAKE_CXX_FLAGS", SAN_FLAGS) \
            or not cached("LRQ_CPU_ALL_VARIANTS", "OFF"):
        _log(f"configuring {FUZZ_BUILD} with {cxx}")
        _run(["cmake", "-S", REPO, "-B", FUZZ_BUILD, "-G", "Ninja", f"-DCMAKE_C_COMPILER={cc}",
              f"-DCMAKE_CXX_COMPILER={cxx}", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
              f"-DCMAKE_C_FLAGS_RELWITHDEBINFO={OPT_FLAGS}", f"-DCMAKE_CXX_FLAGS_RELWITHDEBINFO={OPT_FLAGS}",
              f"-DCMAKE_C_FLAGS={SAN_FLAGS}", f"-DCMAKE_CXX_FLAGS={SAN_FLAGS}",
              "-DLRQ_PYTHON=OFF", "-DGGML_OPENMP=OFF", "-DLRQ_CPU_ALL_VARIANTS=OFF"],
             log=out / "configure.log", env=env)
    _log(f"building libllama and the CPU backend in {FUZZ_BUILD} (-j {jobs}, nice 15; slow the first time)")
    # the CPU backend is a module (GGML_BACKEND_DL) that the harness loads: a target of its own
    _run(["cmake", "--build", FUZZ_BUILD, "--target", "llama", "ggml-cpu", "-j", jobs], log=out / "build.log",
         env=env, nice=15)
    inc = REPO / "build" / "llama.cpp"
    bin_dir = FUZZ_BUILD / "bin"
    # per-variant CPU modules of an earlier configuration would outscore libggml-cpu.so at load
    for stale in bin_dir.glob("libggml-cpu-*.so*"):
        stale.unlink()
    libs = [bin_dir / "libllama.so", bin_dir / "libggml.so", bin_dir / "libggml-base.so"]
    newest = max(p.stat().st_mtime for p in [HARNESS_SRC, *libs])
    if not HARNESS_BIN.is_file() or HARNESS_BIN.stat().st_mtime < newest:
        _log(f"linking {HARNESS_BIN}")
        _run([cxx, "-std=c++17", *SAN_FLAGS.replace("fuzzer-no-link", "fuzzer").split(), *OPT_FLAGS.split(),
              "-I", inc / "include", "-I", inc / "ggml" / "include", HARNESS_SRC, "-o", HARNESS_BIN,
              "-L", bin_dir, "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{bin_dir}"],
             log=out / "harness.log", env=env, nice=15)
    return HARNESS_BIN


# ---- 4. seeds -----------------------------------------------------------------------------------

def ensure_seeds(out: Path, fresh: bool) -> tuple[Path, Path]:
    seeds, dic = out / "seeds", out / "lrq.dict"
    if fresh or not seeds.is_dir() or not any(seeds.glob("*.gguf")) or not dic.is_file():
        _log(f"making the seed corpus in {seeds}")
        shutil.rmtree(seeds, ignore_errors=True)
        _run([sys.executable, HERE / "seeds.py", seeds, "--work", out / "seeds-work", "--dict", dic],
             log=out / "seeds.log")
    return seeds, dic


# ---- 5. the fuzzers -----------------------------------------------------------------------------

_STAT = re.compile(r"^stat::(\w+):\s*(\S+)", re.M)
_PROGRESS = re.compile(r"^#(\d+)\s+(?:DONE|NEW|REDUCE|pulse|INITED|RELOAD)\s+cov: (\d+) ft: (\d+)"
                       r"(?: corp: (\d+)/(\S+))?", re.M)
# fork mode's progress line: "#N: cov: C ft: F corp: K exec/s: R oom/timeout/crash: a/b/c time: Ts"
_FORK = re.compile(r"^#(\d+): cov: (\d+) ft: (\d+) corp: (\d+) exec/s: (\d+) "
                   r"oom/timeout/crash: (\d+)/(\d+)/(\d+) time: (\d+)s", re.M)
_SANITIZER = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer)|"
                        r"runtime error:|SUMMARY: \w+Sanitizer", re.M)


def parse_libfuzzer(text: str) -> dict:
    """Final figures of a libFuzzer (or atheris) log: executions, exec/s, cov, ft, corpus, crash."""
    stats = {k: v for k, v in _STAT.findall(text)}
    prog = _PROGRESS.findall(text)
    last = prog[-1] if prog else None
    done = re.search(r"^Done (\d+) (?:runs )?in (\d+) second", text, re.M)   # atheris prints no stat::
    n = int(stats.get("number_of_executed_units", done.group(1) if done else last[0] if last else 0))
    rate = stats.get("average_exec_per_sec")
    if rate is None and done and int(done.group(2)):
        rate = n // int(done.group(2))
    return {
        "executions": n,
        "exec_per_s": None if rate is None else int(rate),
        "peak_rss_mb": int(stats["peak_rss_mb"]) if "peak_rss_mb" in stats else None,
        "cov": int(last[1]) if last else None,
        "ft": int(last[2]) if last else None,
        "corpus": int(last[3]) if last and last[3] else None,
        "new_units": int(stats["new_units_added"]) if "new_units_added" in stats else None,
        "sanitizer_reports": len(re.findall(r"^SUMMARY: \w+Sanitizer", text, re.M)),
        "crash": bool(re.search(r"==\d+== ERROR: libFuzzer|deadly signal|Test unit written to|"
                                r"ERROR: libFuzzer", text)) or bool(_SANITIZER.search(text)),
        "artifacts": re.findall(r"Test unit written to (\S+)", text),
    }


def crash_signature(binary: Path, crash: Path) -> str:
    """Replays one crash input and names it: the failed GGML_ASSERT / GGML_ABORT, or the
    sanitizer's SUMMARY line, with the innermost frame in llama.cpp / lrq code."""
    proc = subprocess.run([str(binary), str(crash)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **SAN_ENV}, cwd=REPO)
    text = proc.stdout + proc.stderr
    m = re.search(r"([\w./-]+:\d+): (GGML_ASSERT\(.*?\) failed|GGML_ABORT.*)", text) or \
        re.search(r"^SUMMARY: (.*)", text, re.M)
    if not m:
        return f"exit {proc.returncode}, no report (replay did not crash)"
    return " ".join(g for g in m.groups() if g).replace(str(REPO) + "/", "")


def run_cpp(binary: Path, seeds: Path, dic: Path, runs: int, out: Path) -> dict:
    corpus, crashes = out / "corpus-cpp", out / "crashes-cpp"
    corpus.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(crashes, ignore_errors=True)
    crashes.mkdir(parents=True)
    log = out / "cpp.log"
    # keep-going mode, as for atheris: fuzzing runs in child processes (-fork=1) and a crash, OOM
    # or timeout ends only its child; every crash input is kept and replayed below to name it
    cmd = [binary, "-fork=1", "-ignore_crashes=1", "-ignore_ooms=1", "-ignore_timeouts=1",
           f"-runs={runs}", f"-dict={dic}", f"-timeout={TIMEOUT_S}", f"-artifact_prefix={crashes}/",
           "-close_fd_mask=1", corpus, seeds]
    _log(f"libFuzzer: {runs} executions of llama_model_load_from_file (log {log})")
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **SAN_ENV}, cwd=REPO).returncode
    seconds = round(time.monotonic() - t0, 1)
    text = log.read_text(errors="replace")
    res = parse_libfuzzer(text)
    fork = _FORK.findall(text)
    if fork:
        # the line's exec/s is the last child's; the run's own rate is executions / time
        n, cov, ft, corp, _rate, oom, tmo, _crash, t = (int(x) for x in fork[-1])
        res.update(executions=n, cov=cov, ft=ft, corpus=corp, exec_per_s=n // max(t, 1), ooms=oom, timeouts=tmo)
    found: dict[str, int] = {}
    for c in sorted(p for p in crashes.iterdir() if p.suffix != ".txt"):
        sig = crash_signature(binary, c)
        found[sig] = found.get(sig, 0) + 1
        c.with_name(c.name + ".txt").write_text(sig + "\n")
    res.update(fuzzer="libFuzzer (C++ loader)", seconds=seconds, exit=rc, findings=found,
               crashes=sum(found.values()),
               sanitizer_reports=sum(n for s, n in found.items() if "Sanitizer" in s),
               log=str(log))
    return res


def run_py(seeds: Path, dic: Path, runs: int, out: Path) -> dict:
    corpus, findings = out / "corpus-py", out / "findings-py"
    corpus.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(findings, ignore_errors=True)
    log = out / "py.log"
    cmd = [sys.executable, Path(__file__), "_atheris", "--findings", findings, "--",
           f"-atheris_runs={runs}", f"-dict={dic}", f"-timeout={TIMEOUT_S}", "-print_final_stats=1",
           f"-artifact_prefix={findings}/", corpus, seeds]
    _log(f"atheris: {runs} executions of the Python readers (log {log})")
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    res = parse_libfuzzer(log.read_text(errors="replace"))
    counts_file = findings / "counts.json"
    counts = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    res.update(fuzzer="atheris (Python readers)", seconds=round(time.monotonic() - t0, 1), exit=rc,
               findings=counts, crashes=len(counts) + int(rc != 0), log=str(log))
    res["sanitizer_reports"] = None    # pure Python: nothing to sanitize
    return res


def _atheris_worker(argv: list[str]) -> int:
    """Runs in its own process: instrument lrq and gguf-py, then hand over to atheris."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--findings", type=Path, required=True)
    ap.add_argument("fuzzer_args", nargs="*")
    args = ap.parse_args(argv)
    import atheris
    with atheris.instrument_imports(include=["lrq", "gguf"]):
        import gguf  # noqa: F401
        import lrq.gguf_hparams, lrq.gguf_meta, lrq.lrq_file, lrq.model_file  # noqa: E401,F401
    sys.path.insert(0, str(HERE))
    import py_target
    collect = py_target.Collector(args.findings)
    atheris.Setup([sys.argv[0], *args.fuzzer_args], collect)
    atheris.Fuzz()
    return 0


def _table(results: list[dict], load: tuple) -> str:
    rows = ["| fuzzer | executions | seconds | exec/s | cov | ft | corpus | crashes / findings | sanitizer reports |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        san = "n/a" if r.get("sanitizer_reports") is None else r["sanitizer_reports"]
        rows.append(f"| {r['fuzzer']} | {r['executions']} | {r['seconds']} | {r['exec_per_s']} | {r['cov']} | "
                    f"{r['ft']} | {r['corpus']} | {r['crashes']} | {san} |")
    rows.append(f"\nload average (1, 5, 15 min) at the start: {load[0]}, at the end: {load[1]}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_atheris"]:
        return _atheris_worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100_000, help="executions per fuzzer (default 1e5)")
    ap.add_argument("--only", choices=("py", "cpp"), default=None, help="run one fuzzer only")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "fuzz", help="seeds, corpora, logs, findings")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile jobs of the sanitizer build")
    ap.add_argument("--fresh-seeds", action="store_true", help="remake the seed corpus")
    ap.add_argument("--build-only", action="store_true", help="set up (atheris, clang, build, seeds) and stop")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.only != "cpp":
            ensure_atheris()
        binary = build_harness(args.jobs, out) if args.only != "py" else None
        seeds, dic = ensure_seeds(out, args.fresh_seeds)
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.build_only:
        return 0
    load0 = tuple(round(x, 2) for x in os.getloadavg())
    results = []
    if args.only != "cpp":
        results.append(run_py(seeds, dic, args.runs, out))
    if args.only != "py":
        results.append(run_cpp(binary, seeds, dic, args.runs, out))
    load1 = tuple(round(x, 2) for x in os.getloadavg())
    sys.path.insert(0, str(HERE))
    import py_target
    py_target.sweep_stale()
    print(_table(results, (load0, load1)))
    for r in results:
        for sig, n in (r.get("findings") or {}).items():
            print(f"  finding ({r['fuzzer']}): {sig}  x{n}")
        for a in r.get("artifacts") or []:
            print(f"  crash input ({r['fuzzer']}): {a}")
    (out / "summary.json").write_text(json.dumps({"load_average": [load0, load1], "results": results}, indent=2))
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
