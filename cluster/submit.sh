#!/usr/bin/env bash
# Submit an ivgr-dist training job to a running Ray cluster.
#   cluster/submit.sh [--address http://HEAD:8265] [--no-wait] [--submission-id ID] [--stop-grace SECONDS]
#                     [--env NAME]... -- --config configs/qwen2_5_vl_7b.yaml key=value ...
# Everything after `--` goes to `ivgr-dist train`. RAY_ADDRESS (or --address) names the dashboard.
#
# The job's runtime environment is cluster/runtime_env.yaml plus, written to a private temporary file (never on
# the command line, never printed):
#   - RAY_JOB_STOP_WAIT_TIME_S=--stop-grace (default 600): `ray job stop` (and a scheduler that stops the job
#     through it) sends SIGTERM, then SIGKILL after this many seconds; Ray's own default, 3 s, kills the job
#     before it can finish its step and write the checkpoint. Give it a step time plus a checkpoint write.
#   - the values of the environment variables named by --env (default: IVGR_JUDGE_API_KEY and WANDB_API_KEY,
#     each only if it is set in this shell): the judge's API key reaches the driver and every reward worker this
#     way. They are stored with the job's runtime env, which anyone holding the cluster's Ray token can read
#     (`ray job list`); a key file on shared storage (reward.judge.api_key_file) keeps it out of Ray entirely.
# A cluster with token authentication (RAY_AUTH_MODE=token) needs the token here too: RAY_AUTH_TOKEN or
# RAY_AUTH_TOKEN_PATH in this shell (cluster/slurm/ivgr_ray.sbatch sets both up).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
grace="${IVGR_JOB_STOP_GRACE_S:-600}"
submit_flags=()
pass_env=(IVGR_JUDGE_API_KEY WANDB_API_KEY)
while [ $# -gt 0 ]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --no-wait) submit_flags+=(--no-wait); shift ;;
    --submission-id) submit_flags+=(--submission-id "$2"); shift 2 ;;
    --stop-grace) grace="$2"; shift 2 ;;
    --env) pass_env+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
case "$grace" in
  ''|*[!0-9]*) echo "submit.sh: --stop-grace=$grace: must be a whole number of seconds" >&2; exit 2 ;;
esac
cd "$root"

private="$(mktemp -d)"  # mode 0700: the runtime env below may hold secrets
trap 'rm -rf "$private"' EXIT
# The variables' values go from this environment to the file without passing through a command line.
IVGR_SUBMIT_PASS_ENV="${pass_env[*]}" IVGR_SUBMIT_GRACE="$grace" python - "$root/cluster/runtime_env.yaml" \
  "$private/runtime_env.yaml" <<'PY'
import json
import os
import sys

import yaml

with open(sys.argv[1]) as f:
    env = yaml.safe_load(f) or {}
env.pop("working_dir", None)  # given on the command line (the checkout's root)
env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = os.environ["IVGR_SUBMIT_GRACE"]
passed = []
for name in dict.fromkeys(os.environ["IVGR_SUBMIT_PASS_ENV"].split()):
    if os.environ.get(name):
        env_vars[name] = os.environ[name]
        passed.append(name)
env["env_vars"] = env_vars
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump(env, f)  # JSON is YAML
names = ", ".join(passed) if passed else "none"
print(f"submit.sh: job stop grace {env_vars['RAY_JOB_STOP_WAIT_TIME_S']} s; passing to the job: {names}", file=sys.stderr)
PY
ray job submit --address "$address" ${submit_flags[@]+"${submit_flags[@]}"} \
  --working-dir . --runtime-env "$private/runtime_env.yaml" \
  -- python -m ivgr_dist.cli train "$@"
