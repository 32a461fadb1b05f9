#!/usr/bin/env bash
# Cloud TPU VM: create (or reuse) a slice, copy and install this checkout on every worker, start
# training on all hosts in the background, then stream worker 0's log.
#
#   TPU_NAME=tidar-v5e ZONE=us-west4-a PROJECT=my-project ACCELERATOR_TYPE=v5litepod-16 \
#   RUNTIME_VERSION=v2-alpha-tpuv5-lite CONFIG=configs/small.py WORKDIR=gs://my-bucket/runs/small \
#     launch/tpu_vm.sh [train args...]
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: TPU_NAME=... ZONE=... PROJECT=... ACCELERATOR_TYPE=... RUNTIME_VERSION=... \
       CONFIG=configs/<name>.py WORKDIR=gs://<bucket>/<run> launch/tpu_vm.sh [train args...]

  TPU_NAME          TPU VM slice name (created if missing, reused if it exists)
  ZONE              zone with capacity for ACCELERATOR_TYPE, e.g. us-west4-a
  PROJECT           Google Cloud project id
  ACCELERATOR_TYPE  slice type, e.g. v5litepod-16, v5p-32, v4-32
  RUNTIME_VERSION   TPU software version, e.g. v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                    tpu-ubuntu2204-base (v4)
  CONFIG            config file in this checkout, passed as --config
  WORKDIR           gs:// run directory (checkpoints, metrics); every worker writes to it
optional:
  SPOT=1            create the slice as Spot capacity
  PYTHON_VERSION    Python for the workers' venv (default 3.11; the images ship an older one)
  train args        appended to the trainer's flags, e.g. --config.train.steps=1000
EOF
  exit 2
}

missing=()
for var in TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION CONFIG WORKDIR; do
  [[ -n ${!var:-} ]] || missing+=("$var")
done
if ((${#missing[@]} > 0)); then
  echo "missing: ${missing[*]}" >&2
  usage
fi
if [[ $WORKDIR != gs://* ]]; then
  echo "WORKDIR=$WORKDIR: use a gs:// path, which every worker can write" >&2
  usage
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ! -f $repo/$CONFIG ]]; then
  echo "CONFIG=$CONFIG: no such file under $repo (give the path relative to the repository root)" >&2
  exit 2
fi
location=(--zone="$ZONE" --project="$PROJECT")

# Create the slice, or reuse it if it exists with the requested type and is running.
if info=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${location[@]}" \
            --format='value(state,acceleratorType)' 2>/dev/null); then
  read -r state existing_type <<<"$info"
  if [[ $existing_type != "$ACCELERATOR_TYPE" ]]; then
    echo "TPU_NAME=$TPU_NAME exists as $existing_type, not ACCELERATOR_TYPE=$ACCELERATOR_TYPE:" \
         "choose another TPU_NAME or delete the slice" >&2
    exit 1
  fi
  if [[ $state != READY ]]; then
    echo "TPU_NAME=$TPU_NAME is $state; start it with:" \
         "gcloud compute tpus tpu-vm start $TPU_NAME --zone=$ZONE --project=$PROJECT" >&2
    exit 1
  fi
  echo "reusing TPU VM $TPU_NAME ($existing_type)" >&2
else
  create_flags=()
  if [[ ${SPOT:-0} == 1 ]]; then create_flags+=(--spot); fi
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${location[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${create_flags[@]+"${create_flags[@]}"}
fi

mapfile -t worker_ips < <(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${location[@]}" \
                            --flatten=networkEndpoints --format='value(networkEndpoints.ipAddress)')
if ((${#worker_ips[@]} == 0)); then
  echo "could not read the worker addresses of $TPU_NAME" >&2
  exit 1
fi

# Ship the checkout as it is now (tracked and new files, nothing git ignores: no .venv, no runs).
archive=$(mktemp "${TMPDIR:-/tmp}/tidar_jax.XXXXXX")
trap 'rm -f "$archive"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard |
  tar -C "$repo" --null -T - -czf "$archive"
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":tidar_jax.tar.gz "${location[@]}" --worker=all

# The TPU images ship Python 3.10 and the project needs >= 3.11, so uv provides the interpreter;
# the venv survives between launches, so a relaunch only reinstalls what changed.
# shellcheck disable=SC2016  # expanded on the workers
install_cmd='set -euo pipefail
mkdir -p ~/tidar_jax && tar -xzf ~/tidar_jax.tar.gz -C ~/tidar_jax
command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH=~/.local/bin:$PATH
cd ~/tidar_jax
[ -x .venv/bin/python ] || uv venv --python "$PYTHON_VERSION" .venv
uv pip install --python .venv/bin/python -e . "jax[tpu]"'
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" --worker=all \
  --command="PYTHON_VERSION=${PYTHON_VERSION:-3.11}; $install_cmd"

# One process per host. Worker 0 hosts the JAX coordinator; JAX reads each worker's id from the
# TPU metadata server, so only the address and the process count are passed.
train_flags=(--config="$CONFIG" --workdir="$WORKDIR")
if ((${#worker_ips[@]} > 1)); then
  train_flags+=(--coordinator_address="${worker_ips[0]}:8476" --num_processes="${#worker_ips[@]}")
fi
# shellcheck disable=SC2016  # expanded on the workers
run_cmd='cd ~/tidar_jax
if [ -f ~/tidar_train.pid ] && kill -0 "$(cat ~/tidar_train.pid)" 2>/dev/null; then
  echo "$(hostname): training already runs as pid $(cat ~/tidar_train.pid); stop it first" >&2
  exit 1
fi
nohup .venv/bin/python -m tidar_jax.train "$@" >~/tidar_train.log 2>&1 </dev/null &
echo $! >~/tidar_train.pid'
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" --worker=all \
  --command="set -- $(printf '%q ' "${train_flags[@]}" "$@"); $run_cmd"

echo "training started on ${#worker_ips[@]} worker(s); streaming worker 0's log" \
     "(Ctrl-C stops the stream, not the training)" >&2
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" --worker=0 \
  --command='tail -n +1 -F ~/tidar_train.log'
