#!/usr/bin/env bash
# A one-node SLURM cluster for bench's tests: install it (apt-get, when missing), start it, run one command
# against it, stop it.
#
#   tests/slurm/up.sh .venv/bin/python -m pytest -q tests/slurm     # what `make test-slurm` runs
#   tests/slurm/up.sh bash                                           # a shell with the cluster up (sinfo, squeue)
#
# Runs as root on a bare Debian machine: installs Debian's slurm-wlm and munge when slurmctld, slurmd, sbatch or
# munged is missing, writes slurm.conf (tests/slurm/slurm.conf.in) for this host's CPUs and memory into a temporary
# folder that also holds the state, spool, logs and munge key, starts munged (as the munge user), slurmctld and
# slurmd in the foreground as background processes, waits until `sinfo` shows the node idle, then runs the command
# with SLURM_CONF and BENCH_SLURM_CLUSTER (the folder) exported. At exit, also on failure or Ctrl-C, it cancels
# the cluster's jobs and stops the three daemons by the process ids it started; the folder is removed unless the
# command failed (its logs are kept and named) or BENCH_SLURM_KEEP=1. The exit status is the command's.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
ctld_port=${BENCH_SLURM_CTLD_PORT:-16817}      # not SLURM's 6817/6818, so a system slurmctld can run beside it
slurmd_port=${BENCH_SLURM_SLURMD_PORT:-16818}

if [ "$#" -eq 0 ]; then
    echo "usage: tests/slurm/up.sh COMMAND [ARGS...]  (runs COMMAND with a one-node SLURM cluster up)" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "tests/slurm/up.sh: must run as root (it may install packages and starts slurmctld, slurmd, munged)" >&2
    exit 2
fi

# 1. Install, only what is missing. policy-rc.d or the lack of systemd keeps apt from starting the daemons; if it
#    did start a system slurmctld, ours still runs on its own ports and socket.
missing=0
for tool in slurmctld slurmd sbatch squeue scancel sinfo munged munge; do
    command -v "$tool" >/dev/null || missing=1
done
if [ "$missing" -eq 1 ]; then
    t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    echo "slurm: installed slurm-wlm and munge in $((SECONDS - t0)) s"
fi

# 2. The cluster's folder: config, state, spool, logs, munge key and socket.
dir=$(mktemp -d /tmp/bench-slurm.XXXXXX)
chmod 755 "$dir"                               # munged, running as munge, must reach $dir/munge
mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
chmod 755 "$dir/munge"                         # munged: the socket's folder must be searchable by all
head -c 1024 /dev/urandom >"$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
chown -R munge:munge "$dir/munge"

# This host's CPUs, sockets, cores and memory as slurmd sees them: a node line that matches keeps it from being
# drained for a configuration mismatch.
node=$(slurmd -C | head -n 1)
host=$(hostname -s)
sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|$host|g" -e "s|@NODE@|$node|g" \
    -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
    "$here/slurm.conf.in" >"$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf" BENCH_SLURM_CLUSTER="$dir"

munged_pid="" slurmctld_pid="" slurmd_pid=""

stop() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$slurmctld_pid" ] && kill -0 "$slurmctld_pid" 2>/dev/null; then
        # Cancel what is left (a failed test's tasks), then give slurmd a few seconds to end the job steps.
        squeue -h -o %A 2>/dev/null | sort -u | xargs -r scancel 2>/dev/null || true
        for _ in $(seq 20); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    for pid in $slurmd_pid $slurmctld_pid $munged_pid; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $slurmd_pid $slurmctld_pid $munged_pid; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ] || [ "${BENCH_SLURM_KEEP:-0}" = 1 ]; then
        echo "slurm: stopped; logs kept in $dir/log" >&2
    else
        rm -rf "$dir"
    fi
    exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 3. Start the daemons in the foreground (-F, -D) as background jobs of this script: $! is each daemon's own pid.
setpriv --reuid=munge --regid=munge --init-groups \
    munged -F --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
    >"$dir/log/munged.out" 2>&1 &
munged_pid=$!
for _ in $(seq 50); do
    munge -n -S "$dir/munge/munge.socket" 2>/dev/null | unmunge -S "$dir/munge/munge.socket" >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n -S "$dir/munge/munge.socket" | unmunge -S "$dir/munge/munge.socket" >/dev/null ||
    { echo "slurm: munged did not start; $dir/munge/munged.log:" >&2; cat "$dir/munge/munged.log" >&2; exit 1; }

slurmctld -D -i -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
slurmctld_pid=$!
slurmd -D -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 &
slurmd_pid=$!

t0=$SECONDS
state=""
while [ $((SECONDS - t0)) -lt 60 ]; do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
done
if [ "$state" != idle ]; then
    echo "slurm: the node is '${state:-unreachable}' after 60 s, not idle; logs in $dir/log:" >&2
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    exit 1
fi
echo "slurm: node $host idle after $((SECONDS - t0)) s ($node); SLURM_CONF=$SLURM_CONF"

# 4. The command, with the cluster up.
"$@"
