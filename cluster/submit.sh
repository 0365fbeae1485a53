#!/usr/bin/env bash
# Submit an ivgr-dist training job to a running Ray cluster.
#   cluster/submit.sh [--address http://HEAD:8265] [--no-wait] -- --config configs/qwen2_5_vl_7b.yaml key=value ...
# Everything after `--` goes to `ivgr-dist train`. RAY_ADDRESS (or --address) names the dashboard.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
wait_flag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --no-wait) wait_flag="--no-wait"; shift ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
cd "$root"
exec ray job submit --address "$address" $wait_flag \
  --working-dir . --runtime-env cluster/runtime_env.yaml \
  -- python -m ivgr_dist.cli train "$@"
