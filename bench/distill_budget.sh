#!/bin/sh
# Calibration budgets (issue 13 item 3; docs/RESULTS.md "Calibration budgets"): held-out KLD and
# calibration loss of lrq-distill against calibration tokens and Adam steps, and of the
# block-wise lrq-calibrate against its tokens, on SmolLM2-135M with llama.cpp's IQ2_XS codes
# (plan none, per-channel gain / bias).
#
# lrq-distill's Adam has a constant learning rate, and a run resumed from its --resume directory
# writes the bytes of a run straight through (tests/test_distill.py), so one chain per token
# count gives every step count: the run stops at 20, writes its file, is resumed up to 40, ...
#     flock /tmp/lrq-heavy.lock bench/distill_budget.sh [OUT_DIR]
# Inputs (made by the commands of RESULTS "End-to-end distillation (SmolLM2)"):
#     BASE   IQ2_XS codes, plan none, uncalibrated   (lrq-convert --base-type IQ2_XS)
#     CAL    BASE + block-wise gain / bias, sotu-calib 1024 tokens x 20 steps (lrq-calibrate)
set -eu
OUT=${1:-/tmp/distill-budget}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
SRC=${LRQ_SRC:-$HOME/.cache/lrq/assets/SmolLM2-135M-Instruct.Q4_1.gguf}
BASE=${LRQ_BASE:-out/distill/iq2xs-none.gguf}
CAL=${LRQ_CAL:-out/distill/iq2xs-none.cal.gguf}
TOKENS=${LRQ_TOKENS:-1024 4096 16384}
STEPS=${LRQ_STEPS:-20 40 80 160}
BLOCKWISE=${LRQ_BLOCKWISE:-512:20 2048:20}
BIN=${LRQ_PY_BIN:-.venv/bin}
log() { echo "$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a "$OUT/times.txt"; }

for T in $TOKENS; do
  FILES=
  for S in $STEPS; do
    F="$OUT/dist-t$T-s$S.gguf"
    if [ ! -f "$F" ]; then
      log "distill t$T s$S start"
      "$BIN/lrq-distill" "$CAL" "$F" --source "$SRC" --calib-text sotu-calib --tokens "$T" \
          --steps "$S" --lr 1e-3 --threads 1 --resume "$OUT/resume-t$T" -q
      log "distill t$T s$S done"
    fi
    FILES="$FILES $F"
  done
  for X in sotu-eval botchan; do
    # shellcheck disable=SC2086  # the file list is split on purpose
    [ -f "$OUT/eval-t$T-$X.csv" ] || "$BIN/lrq-eval" --ref smollm2-135m --stock "" --text $X \
        --chunks 20 --threads 2 -q $FILES --csv "$OUT/eval-t$T-$X.csv"
  done
  log "eval t$T done"
done

FILES=
for TS in $BLOCKWISE; do
  T=${TS%:*}; S=${TS#*:}
  F="$OUT/cal-t$T-s$S.gguf"
  if [ ! -f "$F" ]; then
    log "calibrate t$T s$S start"
    "$BIN/lrq-calibrate" "$BASE" "$F" --source "$SRC" --text sotu-calib --tokens "$T" --steps "$S" \
        --threads 1 > "$OUT/cal-t$T-s$S.log" 2>&1
    log "calibrate t$T s$S done"
  fi
  FILES="$FILES $F"
done
for X in sotu-eval botchan; do
  # shellcheck disable=SC2086
  [ -f "$OUT/eval-cal-$X.csv" ] || "$BIN/lrq-eval" --ref smollm2-135m --stock "" --text $X \
      --chunks 20 --threads 2 -q $FILES "$CAL" --csv "$OUT/eval-cal-$X.csv"
done
log "all done"
