#!/usr/bin/env bash
# Prefix cache: every request shares a PREFIX_LEN-token system prompt and asks a different short
# question. With prefix caching, TTFT after the first request should drop to about the cost of the
# question; usage.prompt_tokens_details.cached_tokens (kept per request in results.json) shows hits.
# Run once with the server's prefix cache on and once off, then:
#   python -m rtserve bench --compare results/prefix_cache_off/results.json results/prefix_cache/results.json
set -euo pipefail
BASE_URL=${BASE_URL:-http://127.0.0.1:8000}
PYTHON=${PYTHON:-python}
OUT=${OUT:-results/prefix_cache}
exec "$PYTHON" -m rtserve bench --base-url "$BASE_URL" \
  --workload shared-prefix --prefix-len "${PREFIX_LEN:-1024}" --output-len "${OUTPUT_LEN:-64}" \
  --rate "${RATE:-2}" --num-requests "${NUM_REQUESTS:-100}" --seed "${SEED:-0}" \
  --goodput ttft:500 tpot:50 --result-dir "$OUT" "$@"
