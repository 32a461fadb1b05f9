#!/usr/bin/env bash
# A multi-host run in miniature: N processes on this machine, each with D fake CPU devices, joined
# through a coordinator on 127.0.0.1. Exercises the multi-process code paths (jax.distributed,
# global arrays, sharded checkpoints) without a cluster.
#
#   WORKDIR=runs/mp launch/local_multiprocess.sh 2 4 --config=configs/tiny.py --config.train.steps=20
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: [WORKDIR=DIR] [PYTHON=python] [MODULE=tidar_jax.train] \
       launch/local_multiprocess.sh N DEVICES_PER_PROCESS [train args...]

  N                    number of processes (>= 1)
  DEVICES_PER_PROCESS  fake CPU devices in each process (>= 1)
  train args           passed to every process, e.g. --config=configs/tiny.py
  WORKDIR              run directory, passed as --workdir; per-process logs go to
                       $WORKDIR/proc_<i>.log (default: runs/local_multiprocess)
  PYTHON               interpreter (default: python)
  MODULE               module to run with -m (default: tidar_jax.train)
EOF
  exit 2
}

[[ $# -ge 2 && $1 =~ ^[1-9][0-9]*$ && $2 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
devices_per_process=$2
shift 2
WORKDIR=${WORKDIR:-runs/local_multiprocess}
PYTHON=${PYTHON:-python}
MODULE=${MODULE:-tidar_jax.train}
mkdir -p "$WORKDIR"

# A port the kernel reports free on the loopback interface; the coordinator binds to 127.0.0.1
# only (JAX_COORDINATOR_BIND_ADDRESS), so nothing is exposed beyond this machine.
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
coordinator="127.0.0.1:$port"

pids=()
# SIGTERM is caught (by JAX's preemption notifier and by the trainer, to checkpoint at the next step
# boundary, which never comes once a peer is gone), so escalate to SIGKILL after a grace period.
any_alive() {
  local pid
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then return 0; fi
  done
  return 1
}
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  for _ in 1 2 3 4 5; do
    any_alive || return 0
    sleep 1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process" \
  JAX_COORDINATOR_BIND_ADDRESS="$coordinator" \
    "$PYTHON" -m "$MODULE" --workdir="$WORKDIR" "$@" \
      --coordinator_address="$coordinator" --num_processes="$num_processes" --process_id="$i" \
      >"$WORKDIR/proc_$i.log" 2>&1 &
  pids+=("$!")
done
echo "started $num_processes processes x $devices_per_process CPU devices (coordinator $coordinator);" \
     "logs: $WORKDIR/proc_<i>.log" >&2

# Poll instead of waiting in order: after one process dies its peers block in the next collective
# (until JAX's heartbeat timeout, minutes later), so stop them as soon as any process fails.
exit_codes=()
status=0
remaining=$num_processes
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    [[ -z ${exit_codes[i]:-} ]] || continue
    if kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
    rc=0
    wait "${pids[i]}" || rc=$?
    exit_codes[i]=$rc
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "process $i failed with exit code $rc; stopping the others. Its log ($WORKDIR/proc_$i.log) ends:" >&2
      tail -n 20 "$WORKDIR/proc_$i.log" >&2
      stop_all
    fi
  done
  ((remaining == 0)) || sleep 1
done
echo "exit codes by process: ${exit_codes[*]}" >&2
exit "$status"
