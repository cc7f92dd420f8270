#!/usr/bin/env bash
# Replicated stock-typed models on CUDA: same perplexity as the CPU (within 0.5 %), and decode
# speed of the replicated model relative to its unreplicated base, on one GPU.
#
# Example (on a machine with an NVIDIA GPU and the CUDA toolkit, from the repository root):
#   # on any machine with lrq installed: the unreplicated base and a replicated, calibrated file
#   lrq-convert smollm2.gguf base.gguf --base-type IQ2_XS --calib sotu-calib --plan none
#   lrq-convert smollm2.gguf all.gguf  --base-type IQ2_XS --calib sotu-calib --plan all
#   lrq-calibrate all.gguf all.cal.gguf --source smollm2.gguf --tokens 1024 --steps 20
#   # on the GPU machine (needs the patched tree: `make build` once, or a copy of build/llama.cpp)
#   bench/cuda.sh base.gguf all.cal.gguf eval.txt [chunks]
#
# Why this works without a CUDA kernel of lrq's: a stock-typed base's replicas are ggml_clamp,
# ggml_mul_mat, ggml_mul and ggml_add (docs/FORMAT.md section 6.1), which CUDA has.  LRQ-typed
# codes (GGML_OP_LRQ_MUL_MAT) stay on the CPU; this script is about stock-typed bases.
set -euo pipefail
base=${1:?usage: bench/cuda.sh BASE.gguf REPLICATED.gguf TEXT.txt [CHUNKS]}
repl=${2:?usage: bench/cuda.sh BASE.gguf REPLICATED.gguf TEXT.txt [CHUNKS]}
text=${3:?usage: bench/cuda.sh BASE.gguf REPLICATED.gguf TEXT.txt [CHUNKS]}
chunks=${4:-20}
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$here/build/llama.cpp
out=${OUT:-$here/build/cuda-out}
mkdir -p "$out"

if [ ! -f "$tree.lrq-prepared" ]; then
  python3 "$here/patches/prepare.py" "$tree"      # needs the sdist (network or ~/.cache/lrq)
fi
cmake -S "$here" -B "$here/build/cuda" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
  -DLRQ_PYTHON=OFF >"$out/cmake-configure.log" || { cat "$out/cmake-configure.log"; exit 1; }
cmake --build "$here/build/cuda" --target llama-perplexity llama-bench -j "$(nproc)" >"$out/build.log" \
  || { tail -50 "$out/build.log"; exit 1; }
bin=$here/build/cuda/bin

ppl() {   # model ngl -> "PPL"
  "$bin/llama-perplexity" -m "$1" -f "$text" -c 512 --chunks "$chunks" -ngl "$2" >"$out/ppl-$(basename "$1")-ngl$2.log" 2>&1
  sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$out/ppl-$(basename "$1")-ngl$2.log"
}
tg() {    # model -> decode tokens/s on the GPU
  "$bin/llama-bench" -m "$1" -p 0 -n 128 -ngl 99 -r 3 -o csv 2>/dev/null | tail -1 | \
    python3 -c 'import csv,sys; r=list(csv.reader(sys.stdin))[-1]; print(r[-2])' 2>/dev/null || echo nan
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
printf '| model | PPL CPU | PPL CUDA | rel. diff | decode t/s CUDA | vs base |\n|---|---|---|---|---|---|\n' | tee "$out/table.md"
tg_base=$(tg "$base")
for m in "$base" "$repl"; do
  c=$(ppl "$m" 0); g=$(ppl "$m" 99); t=$(tg "$m")
  python3 - "$m" "$c" "$g" "$t" "$tg_base" <<'EOF' | tee -a "$out/table.md"
import sys
m, c, g, t, tb = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
d = abs(g - c) / c
print(f"| {m.split('/')[-1]} | {c:.4f} | {g:.4f} | {100 * d:.3f} % {'(ok)' if d <= 0.005 else '(> 0.5 %!)'} | {t:.1f} | {t / tb:.2f}x |")
EOF
done
