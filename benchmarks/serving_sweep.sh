#!/usr/bin/env bash
# Serving sweep: synthetic prompts (uniform lengths around INPUT_LEN/OUTPUT_LEN, ignore_eos so every
# request generates its full length) at several Poisson rates, with vLLM-comparable TTFT/TPOT/ITL,
# throughput and goodput against ttft:500 tpot:50. Extra arguments go to `rtserve bench`.
set -euo pipefail
BASE_URL=${BASE_URL:-http://127.0.0.1:8000}
PYTHON=${PYTHON:-python}
OUT=${OUT:-results/serving_sweep}
exec "$PYTHON" -m rtserve bench --base-url "$BASE_URL" \
  --workload synthetic --input-len "${INPUT_LEN:-256}" --output-len "${OUTPUT_LEN:-128}" \
  --len-dist uniform --ignore-eos \
  --sweep-rates "${RATES:-1,2,4,8,16}" --num-requests "${NUM_REQUESTS:-100}" --seed "${SEED:-0}" \
  --goodput ttft:500 tpot:50 --result-dir "$OUT" "$@"
