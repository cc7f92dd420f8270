#!/bin/sh
# SmolLM2 end to end with real two-level files (docs/two_level.md, "SmolLM2 end to end" and
# "--mix with the two-level layout"): lrq-convert --layout two-level:16 and :32 (importance from
# act-mse statistics of sotu-calib), GPTQ (two-level:16), and GPTQ two-level:16 with --mix q2k
# and --mix v4 (the widened tensors single-level LRQ3 / LRQ4 groups of 256), then lrq-eval on
# 10 chunks of sotu-eval and of botchan against the cached F32 reference.
#     flock /tmp/lrq-heavy.lock nice -n 10 bench/two_level_e2e.sh [OUT_DIR [all|mix]]
set -eu
OUT=${1:-/tmp/tl-e2e}
PART=${2:-all}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
REF=${LRQ_REF:-$HOME/.cache/lrq/eval/SmolLM2-135M-Instruct.Q4_1.F32.gguf}
uptime
FILES=
if [ "$PART" = all ]; then
  for B in 16 32; do
    .venv/bin/lrq-convert "$REF" "$OUT/smollm2-tl$B.gguf" --bits 2 --group-size 256 \
       --layout two-level:$B --scale-search act-mse --calib-text sotu-calib -q
  done
  .venv/bin/lrq-convert "$REF" "$OUT/smollm2-tl16-gptq.gguf" --bits 2 --group-size 256 \
     --layout two-level:16 --gptq --calib-text sotu-calib -q
  FILES="$OUT/smollm2-tl16.gguf $OUT/smollm2-tl32.gguf $OUT/smollm2-tl16-gptq.gguf"
fi
for MIX in q2k v4; do
  .venv/bin/lrq-convert "$REF" "$OUT/smollm2-tl16-$MIX-gptq.gguf" --bits 2 --group-size 256 \
     --layout two-level:16 --mix $MIX --gptq --calib-text sotu-calib -q
  FILES="$FILES $OUT/smollm2-tl16-$MIX-gptq.gguf"
done
uptime
for T in sotu-eval botchan; do
  # shellcheck disable=SC2086  # the file list is split on purpose
  .venv/bin/lrq-eval --ref smollm2-135m --text $T --chunks 10 --threads 2 -q $FILES --csv "$OUT/$T.csv"
done
uptime
