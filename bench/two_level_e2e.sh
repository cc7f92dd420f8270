#!/bin/sh
# SmolLM2 end to end with real two-level files (docs/two_level.md, "SmolLM2 end to end" and
# "--mix with the two-level layout"): lrq-convert --layout two-level:16 and :32 (importance from
# act-mse statistics of sotu-calib), GPTQ (two-level:16), and GPTQ two-level:16 with --mix
# (the widened tensors single-level LRQ3 / LRQ4 groups of the group size), then lrq-eval on
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
# q2k: llama.cpp's Q2_K file mix; qk2: only q and k at 2 bits (two-level), v 4, the rest 3
QK2='attn_v\.=4,attn_output\.=3,ffn_down\.=3,ffn_up\.=3,ffn_gate\.=3'
for V in q2k:256 q2k:128 qk2:256 qk2:128; do
  MIX=${V%%:*}; G=${V##*:}
  if [ "$MIX" = qk2 ]; then RULES=$QK2; else RULES=$MIX; fi
  .venv/bin/lrq-convert "$REF" "$OUT/smollm2-tl16-$MIX-g$G-gptq.gguf" --bits 2 --group-size "$G" \
     --layout two-level:16 --mix "$RULES" --gptq --calib-text sotu-calib -q
  FILES="$FILES $OUT/smollm2-tl16-$MIX-g$G-gptq.gguf"
done
# stock IQ2_XS + imatrix (lrq-eval's cached file) under the same protocol
FILES="$FILES $HOME/.cache/lrq/eval/SmolLM2-135M-Instruct.Q4_1.IQ2_XS.imat.gguf"
uptime
for T in sotu-eval botchan; do
  # shellcheck disable=SC2086  # the file list is split on purpose
  .venv/bin/lrq-eval --ref smollm2-135m --text $T --chunks 10 --threads 2 -q $FILES --csv "$OUT/$T.csv"
done
uptime
