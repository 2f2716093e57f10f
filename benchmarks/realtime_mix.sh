#!/usr/bin/env bash
# Real-time mix: firm/soft interactive chats with TTFT/ITL budgets (rt extension, sent automatically
# to rtserve) next to long-prompt batch summaries, swept over rates. Reports attainment overall
# (--goodput) and per class against each request's own budget. Add `--rt-extension off` to measure
# the same load without the budgets (e.g. FCFS baseline), then compare the two results.json.
set -euo pipefail
BASE_URL=${BASE_URL:-http://127.0.0.1:8000}
PYTHON=${PYTHON:-python}
OUT=${OUT:-results/realtime_mix}
exec "$PYTHON" -m rtserve bench --base-url "$BASE_URL" \
  --workload realtime-mix --mix "${MIX:-firm:0.3,soft:0.5,batch:0.2}" \
  --rt-ttft-ms "${RT_TTFT_MS:-500}" --rt-itl-ms "${RT_ITL_MS:-50}" \
  --long-input-len "${LONG_INPUT_LEN:-2048}" --long-output-len "${LONG_OUTPUT_LEN:-128}" \
  --sweep-rates "${RATES:-0.5,1,2,4}" --burstiness "${BURSTINESS:-1.0}" \
  --duration-s "${DURATION_S:-60}" --seed "${SEED:-0}" \
  --goodput ttft:500 tpot:50 --result-dir "$OUT" "$@"
