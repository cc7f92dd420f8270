#!/usr/bin/env bash
# LRQ on an NVIDIA GPU (issue 17): the op against the CPU, perplexity CUDA vs CPU, decode / prompt
# speed against stock 2-bit files, and decode bandwidth against the GPU's own copy bandwidth.
#
#   bench/cuda.sh prepare [SRC.gguf] [DIR]   CPU machine, heavy (run under flock /tmp/lrq-heavy.lock):
#                                            the model files of the GPU run (default SRC: the
#                                            Qwen2.5-Coder-1.5B asset, DIR build/cuda-models)
#   bench/cuda.sh pack [DIR]                 CPU machine: .cuda-stage/ for the device tool (below)
#   bench/cuda.sh run [DIR]                  GPU machine, about 10 minutes on one H200 with 16 cores
#   bench/cuda.sh dry-run                    CPU machine: every step but the GPU's, on SmolLM2
#
# `run` writes $OUT (default build/cuda-out): table.md (every figure), op-check.txt, build and
# tool logs.  Steps of `run`:
#   1. build: -DGGML_CUDA=ON for the GPU's own architecture (nvidia-smi's compute capability),
#      FlashAttention kernels and NCCL off (build time; neither is used here), tools only;
#   2. bench/cuda_op_check: GGML_OP_LRQ_MUL_MAT on the GPU for every bits x group x mode, 1 / 3 /
#      8 / 40 tokens and fused parallel replicas, against the CPU backend (NMSE <= 1e-8) and the
#      float64 reference (NMSE <= 2e-3) -- the bounds are named in cuda_op_check.cpp; then the
#      device-to-device copy bandwidth and the op's decode bandwidth (GB/s of weight bytes);
#   3. perplexity CPU (-ngl 0 -dev none --no-op-offload) vs CUDA (-ngl 99) of the replicated LRQ
#      files and of IQ2_XS + adapter (--lrq-adapter), PPL_REL_TOL = 0.5 % apart at most;
#   4. llama-bench (-ngl 99): LRQ2 none / all / parallel against stock Q2_K and IQ2_XS, prompt
#      (pp512) and decode (tg128) tokens/s, decode GB/s = file bytes x t/s (every weight read
#      once per token; a replicated layer's codes are read once per execution).
# Exit status: 0 when every check passed, 1 when one failed (the table says which), 2 on a setup error.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$here/build/cuda-out}
PPL_REL_TOL=0.005          # CUDA vs CPU perplexity: the op's float summation order only
PPL_CHUNKS=${PPL_CHUNKS:-10}
PY=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}   # CPU threads of the tools (the dry run on a shared 2-core machine: THREADS=1)
[ -x "$here/.venv/bin/python" ] && PY=$here/.venv/bin/python

die() { echo "bench/cuda.sh: $*" >&2; exit 2; }
log() { echo "== $*" >&2; }

# ---- model files (CPU) ---------------------------------------------------------------------------
# lrq2-none / lrq2-all / lrq2-parallel: LRQ2 codes of SRC, no replica / every layer twice in series /
# every layer as a parallel group of two (replicas at their identity parameters: the CUDA vs CPU
# comparison needs replicated graphs, not calibrated ones); q2_k, iq2_xs (imatrix on sotu-calib):
# llama-quantize of SRC; iq2_xs.adapter.gguf: lrq-calibrate --adapter of iq2_xs with plan `all`.
# LRQ2 codes: Q2_K's mixed precision and the data-free MSE clipping by default (LRQ_CONVERT_ARGS),
# so that the LRQ rows compare a usable model rather than plain 2-bit rounding (perplexities in the
# hundreds of thousands on SmolLM2, where CPU vs GPU differences say little).
LRQ_CONVERT_ARGS=${LRQ_CONVERT_ARGS:---bits 2 --mix q2k --scale-search mse}
prepare() {
  local src=${1:-} dir=${2:-$here/build/cuda-models} tokens=${CAL_TOKENS:-1024} steps=${CAL_STEPS:-20}
  local bin=$here/build/cmake/bin
  [ -n "$src" ] || src=$("$PY" -c 'import lrq.assets as a; print(a.path("qwen2.5-1.5b"))' 2>/dev/null) \
    || die "no source model: pass SRC.gguf (or fetch the qwen2.5-1.5b asset: lrq-info --json)"
  [ -f "$src" ] || die "source model $src not found"
  [ -x "$bin/llama-quantize" ] || die "no CPU build in $bin: run make build"
  mkdir -p "$dir"
  local calib
  calib=$("$PY" -c 'import lrq.assets as a; print(a.path("sotu-calib"))')
  "$PY" - "$dir/parallel.json" "$src" <<'EOF'
import json, sys
from lrq.gguf_hparams import open_reader, read_kv
kv = read_kv(open_reader(sys.argv[2]))
n = int(kv[kv["general.architecture"] + ".block_count"])
json.dump({"layers": {str(i): {"replicas": 2, "mode": "parallel"} for i in range(n)}}, open(sys.argv[1], "w"))
EOF
  cp "$("$PY" -c 'import lrq.assets as a; print(a.path("sotu-eval"))')" "$dir/sotu-eval.txt"   # the GPU machine has no lrq
  for plan in none all parallel; do
    local p=$plan; [ "$plan" = parallel ] && p=$dir/parallel.json
    # shellcheck disable=SC2086
    [ -f "$dir/lrq2-$plan.gguf" ] || "$here/.venv/bin/lrq-convert" -q "$src" "$dir/lrq2-$plan.gguf" $LRQ_CONVERT_ARGS --plan "$p"
  done
  [ -f "$dir/imatrix.gguf" ] || "$bin/llama-imatrix" -t "$THREADS" -m "$src" -f "$calib" -c 512 --chunks "${IMATRIX_CHUNKS:-32}" -o "$dir/imatrix.gguf" \
    >"$dir/imatrix.log" 2>&1 || { tail -20 "$dir/imatrix.log"; die "llama-imatrix failed"; }
  [ -f "$dir/q2_k.gguf" ] || "$bin/llama-quantize" --allow-requantize "$src" "$dir/q2_k.gguf" Q2_K "$THREADS" >"$dir/quantize.log" 2>&1
  [ -f "$dir/iq2_xs.gguf" ] || "$bin/llama-quantize" --allow-requantize --imatrix "$dir/imatrix.gguf" "$src" "$dir/iq2_xs.gguf" IQ2_XS "$THREADS" \
    >>"$dir/quantize.log" 2>&1 || { tail -20 "$dir/quantize.log"; die "llama-quantize failed"; }
  [ -f "$dir/iq2_xs.adapter.gguf" ] || "$here/.venv/bin/lrq-calibrate" -q "$dir/iq2_xs.gguf" --adapter "$dir/iq2_xs.adapter.gguf" \
    --plan all --source "$src" --text sotu-calib --tokens "$tokens" --window "${CAL_WINDOW:-512}" --steps "$steps" --threads "$THREADS"
  ls -la "$dir"
}

# ---- staging for the device tool ------------------------------------------------------------------
# The device machine of this workplace reaches nothing outside itself and receives the working tree
# (tracked files plus carried, ignored paths) up to 64 MiB a call.  pack puts into .cuda-stage/
# (ignored through .git/info/exclude) what `run` needs beside the tracked files: the patched
# llama.cpp tree without its git history, docs, vocab models and tests (xz), and the model files
# of DIR that fit, largest last; it prints the total and the files left out.  On the device:
#   carry [".cuda-stage"], command: mkdir -p build && tar xJf .cuda-stage/llama.cpp.tar.xz -C build \
#     && bench/cuda.sh run .cuda-stage/models
pack() {
  local dir=${1:-$here/build/cuda-models} stage=$here/.cuda-stage limit=$((64 * 1024 * 1024 - 2 * 1024 * 1024))
  grep -qx '/.cuda-stage/' "$here/.git/info/exclude" 2>/dev/null || echo '/.cuda-stage/' >>"$here/.git/info/exclude"
  rm -rf "$stage"; mkdir -p "$stage/models"
  tar -C "$here/build" --exclude=.git --exclude=llama.cpp/docs --exclude=llama.cpp/models --exclude=llama.cpp/tests \
    --exclude=llama.cpp/examples --exclude=llama.cpp/media --exclude=llama.cpp/benches \
    --exclude=llama.cpp/ggml/src/ggml-vulkan --exclude=llama.cpp/ggml/src/ggml-sycl --exclude=llama.cpp/ggml/src/ggml-opencl \
    --exclude=llama.cpp/ggml/src/ggml-hexagon -cJf "$stage/llama.cpp.tar.xz" llama.cpp
  local used; used=$(( $(git -C "$here" ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) + $(stat -c %s "$stage/llama.cpp.tar.xz") ))
  cp "$dir/sotu-eval.txt" "$stage/models/" && used=$((used + $(stat -c %s "$dir/sotu-eval.txt")))
  local f
  for f in $(ls -Sr "$dir"/*.gguf 2>/dev/null); do
    case $(basename "$f") in imatrix.gguf) continue;; esac
    if [ $((used + $(stat -c %s "$f"))) -le "$limit" ]; then
      cp "$f" "$stage/models/"; used=$((used + $(stat -c %s "$f")))
    else
      echo "pack: left out (does not fit in one call): $(basename "$f") $(($(stat -c %s "$f") / 1048576)) MiB" >&2
    fi
  done
  echo "pack: $((used / 1048576)) MiB of the tree would travel ($stage)" >&2
}

# ---- build -----------------------------------------------------------------------------------------
# CUDA toolkit: nvcc on PATH, /usr/local/cuda, or (CPU dry run) the pip nvcc of .venv (make testdeps).
find_nvcc() {
  local c
  for c in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda/bin/nvcc \
           "$here"/.venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

configure_cuda() {   # build dir, architectures
  local nvcc; nvcc=$(find_nvcc) || die "no nvcc (CUDA toolkit): set CUDACXX or install it"
  [ -f "$here/build/llama.cpp.lrq-prepared" ] || [ -f "$here/build/llama.cpp/CMakeLists.txt" ] \
    || "$PY" "$here/patches/prepare.py" "$here/build/llama.cpp"
  cmake -S "$here" -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES="$2" -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DLRQ_PYTHON=OFF ${CMAKE_EXTRA:-} \
    >"$out/cmake-configure.log" 2>&1 || { tail -40 "$out/cmake-configure.log"; die "cmake configure failed"; }
}

build_op_check() {   # bin dir -> $out/cuda_op_check
  local inc=(-I "$here/build/llama.cpp/ggml/include" -I "$here/native/include")
  gcc -std=c11 -O2 -ffp-contract=off "${inc[@]}" -c "$here/native/lrq/ref.c" -o "$out/ref.o"
  g++ -std=c++17 -O2 "${inc[@]}" "$here/bench/cuda_op_check.cpp" "$out/ref.o" -L"$1" -lggml -lggml-base \
    -Wl,-rpath,"$1" -o "$out/cuda_op_check"
}

# ---- measurements ----------------------------------------------------------------------------------
ppl() {   # bin model tag args... -> PPL (and log in $out)
  local bin=$1 model=$2 tag=$3; shift 3
  "$bin/llama-perplexity" -m "$model" -f "$TEXT" -c 512 --chunks "$PPL_CHUNKS" "$@" >"$out/ppl-$tag.log" 2>&1 || true
  sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$out/ppl-$tag.log" | tail -1
}

bench_speed() {   # bin model tag args... -> "pp_ts tg_ts"
  local bin=$1 model=$2 tag=$3; shift 3
  "$bin/llama-bench" -m "$model" -p 512 -n 128 -r "${BENCH_REPS:-3}" -o json "$@" >"$out/bench-$tag.json" 2>"$out/bench-$tag.log" || true
  "$PY" - "$out/bench-$tag.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except Exception:
    print("nan nan"); sys.exit()
pp = [r["avg_ts"] for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0]
tg = [r["avg_ts"] for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
print(f"{pp[0] if pp else float('nan'):.1f} {tg[0] if tg else float('nan'):.1f}")
EOF
}

# PPL CPU vs GPU and speed for the model files in $1 with the tools in $2; GPU args in $3.
measure() {
  local dir=$1 bin=$2 gpu_args=$3 fail=0 m c g rel
  local cpu_args="-ngl 0 -dev none --no-op-offload -t $THREADS"
  printf '\n| model | PPL CPU | PPL %s | rel. diff |\n|---|---|---|---|\n' "$GPU_NAME" >>"$out/table.md"
  for m in lrq2-all lrq2-parallel iq2_xs+adapter lrq2-none; do
    local f=$dir/$m.gguf extra=()
    [ "$m" = iq2_xs+adapter ] && { f=$dir/iq2_xs.gguf; extra=(--lrq-adapter "$dir/iq2_xs.adapter.gguf"); }
    [ -f "$f" ] || { echo "| $m | missing | | |" >>"$out/table.md"; fail=1; continue; }
    # shellcheck disable=SC2086
    c=$(ppl "$bin" "$f" "$m-cpu" $cpu_args "${extra[@]}")
    # shellcheck disable=SC2086
    g=$(ppl "$bin" "$f" "$m-gpu" $gpu_args "${extra[@]}")
    rel=$("$PY" -c "import sys; c, g = float('${c:-nan}'), float('${g:-nan}'); d = abs(g - c) / c; print(f'{100 * d:.3f} %', 'ok' if d <= $PPL_REL_TOL else 'FAIL')")
    case $rel in *FAIL*) fail=1;; esac
    echo "| $m | ${c:-error} | ${g:-error} | $rel |" >>"$out/table.md"
  done
  printf '\n| model | file MB | pp512 t/s | tg128 t/s | decode GB/s | tg vs Q2_K |\n|---|---|---|---|---|---|\n' >>"$out/table.md"
  local tg_q2k=""
  # lrq2-parallel twice: in the lockstep order (patch 0013: each group's members adjacent, so the
  # CUDA backend fuses them into one read of the codes) and in the built order (LRQ_NO_LOCKSTEP=1)
  for m in q2_k iq2_xs lrq2-none lrq2-all lrq2-parallel lrq2-parallel-unfused; do
    local f=$dir/${m%-unfused}.gguf lockstep=
    [ "$m" = lrq2-parallel-unfused ] && lockstep=1
    [ -f "$f" ] || { echo "| $m | missing | | | | |" >>"$out/table.md"; continue; }
    # shellcheck disable=SC2086
    read -r pp tg < <(LRQ_NO_LOCKSTEP=$lockstep bench_speed "$bin" "$f" "$m" $gpu_args)
    [ "$m" = q2_k ] && tg_q2k=$tg
    "$PY" - "$m" "$f" "$pp" "$tg" "${tg_q2k:-nan}" >>"$out/table.md" <<'EOF'
import os, sys
m, f, pp, tg, ref = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
mb = os.path.getsize(f) / 1e6
print(f"| {m} | {mb:.0f} | {pp:.1f} | {tg:.1f} | {mb * tg / 1e3:.1f} | {tg / ref:.2f}x |")
EOF
  done
  return $fail
}

run() {
  local dir=${1:-$here/build/cuda-models} bdir=$here/build/cuda fail=0
  mkdir -p "$out"; : >"$out/table.md"
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: not a GPU machine (use dry-run)"
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  local arch; arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
  TEXT=${TEXT:-$dir/sotu-eval.txt}
  [ -f "$TEXT" ] || die "no evaluation text $TEXT (set TEXT=)"
  { echo "# LRQ on $GPU_NAME (sm_$arch), $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
    "$(find_nvcc)" --version | tail -2; } >>"$out/table.md"
  log "build (sm_$arch)"
  local t0=$SECONDS
  configure_cuda "$bdir" "$arch"
  cmake --build "$bdir" --target llama-perplexity llama-bench -j "$(nproc)" >"$out/build.log" 2>&1 \
    || { tail -60 "$out/build.log"; die "build failed"; }
  echo "build: $((SECONDS - t0)) s" >>"$out/table.md"
  build_op_check "$bdir/bin"
  # BUILD_ONLY=1: stop here.  build/cuda stays on a warm device machine, so a second call (the
  # build is then a no-op) can spend a whole command's 10 minutes on the measurements.
  [ "${BUILD_ONLY:-0}" = 1 ] && { cat "$out/table.md"; return 0; }
  log "op check"
  printf '\n```\n' >>"$out/table.md"
  "$out/cuda_op_check" "$bdir/bin" --require-gpu --bandwidth >"$out/op-check.txt" 2>"$out/op-check.log" || fail=1
  grep -E "^(gpu devices|bandwidth)" "$out/op-check.txt" >>"$out/table.md" || true
  "$PY" - "$out/op-check.txt" >>"$out/table.md" <<'EOF'
import re, sys
rows = [dict(kv.split("=", 1) for kv in l.split() if "=" in kv) for l in open(sys.argv[1]) if l.startswith("device=")]
gpu = [r for r in rows if r["device"] != "CPU" and r["supported"] == "1"]
for k in ("nmse_cpu", "nmse_ref"):
    v = [float(r[k]) for r in gpu]
    print(f"{k}: {len(v)} GPU cases, max {max(v) if v else float('nan'):.3e}")
EOF
  printf '```\n' >>"$out/table.md"
  log "perplexity and speed"
  measure "$dir" "$bdir/bin" "-ngl 99" || fail=1
  cat "$out/table.md"
  return $fail
}

# ---- dry run (CPU) ---------------------------------------------------------------------------------
# Everything that does not need a GPU: the model files (SmolLM2, a short calibration), pack, the
# configure of the packed tree -- with CUDA when CUDA_TOOLKIT names a toolkit root (nvcc, cudart and
# cuBLAS; docs/cuda.md: the pip packages suffice), then the compile of ggml-cuda.cu and lrq's CUDA
# objects with ggml-cuda's flags --, the op check and the perplexity / speed tables on the CPU build
# (CPU against CPU: the plumbing, not a result).
dry_run() {
  local dir=$here/build/cuda-dry bdir=$here/build/cuda-dry/cmake
  mkdir -p "$out" "$dir"; : >"$out/table.md"
  GPU_NAME="CPU (dry run)"
  local src; src=$("$PY" -c 'import lrq.assets as a; print(a.path("smollm2-135m"))')
  log "prepare (SmolLM2)"
  IMATRIX_CHUNKS=4 CAL_WINDOW=128 CAL_TOKENS=${CAL_TOKENS:-256} CAL_STEPS=${CAL_STEPS:-2} prepare "$src" "$dir/models"
  log "pack"
  pack "$dir/models" 2>&1 | tee -a "$out/table.md"
  log "configure the packed tree"
  rm -rf "$dir/src" "$bdir"; mkdir -p "$dir/src"
  tar -C "$dir/src" -xJf "$here/.cuda-stage/llama.cpp.tar.xz"
  if [ -n "${CUDA_TOOLKIT:-}" ]; then
    CUDACXX=$CUDA_TOOLKIT/bin/nvcc CMAKE_EXTRA="-DCUDAToolkit_ROOT=$CUDA_TOOLKIT -DGGML_CUDA_NO_VMM=ON -DLRQ_LLAMA_DIR=$dir/src/llama.cpp" \
      configure_cuda "$bdir" 90
    local objs; objs=$(ninja -C "$bdir" -t targets all 2>/dev/null | grep -oE '^[^:]*(native/cuda/[^:]*|ggml-cuda[.]cu)[.]o' | sort -u)
    [ "$(echo "$objs" | grep -c native/cuda)" = 3 ] || die "lrq's CUDA sources are not in the ggml-cuda target (CMakeLists.txt)"
    # shellcheck disable=SC2086
    ninja -C "$bdir" $objs >"$out/cuda-objects.log" 2>&1 || { tail -40 "$out/cuda-objects.log"; die "CUDA objects do not compile"; }
    echo "packed tree: CUDA configure, ggml-cuda.cu + lrq's CUDA objects compiled (sm_90)" >>"$out/table.md"
  else
    cmake -S "$here" -B "$bdir" -G Ninja -DLRQ_PYTHON=OFF -DLRQ_LLAMA_DIR="$dir/src/llama.cpp" >"$out/cmake-configure.log" 2>&1 \
      || { tail -40 "$out/cmake-configure.log"; die "the packed tree does not configure"; }
    echo "packed tree: CPU configure only (CUDA_TOOLKIT unset)" >>"$out/table.md"
  fi
  log "op check (CPU backend)"
  build_op_check "$here/build/cmake/bin"
  "$out/cuda_op_check" "$here/build/cmake/bin" --quick >"$out/op-check.txt" 2>"$out/op-check.log" \
    || { tail "$out/op-check.txt"; die "op check failed on the CPU"; }
  tail -1 "$out/op-check.txt" >>"$out/table.md"
  log "perplexity and speed tables (CPU)"
  TEXT=$dir/models/sotu-eval.txt PPL_CHUNKS=2 BENCH_REPS=1 measure "$dir/models" "$here/build/cmake/bin" "-ngl 0 -t $THREADS" || true
  cat "$out/table.md"
}

case ${1:-} in
  prepare) shift; prepare "$@";;
  pack) shift; pack "$@";;
  run) shift; run "$@";;
  dry-run) dry_run;;
  *) sed -n '2,13p' "$0" >&2; exit 2;;
esac
