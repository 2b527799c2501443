#!/usr/bin/env bash
# local_slurm.sh -- a real single-node Slurm cluster (Debian 12: slurm-wlm 22.05 + munge)
# on loopback, with every file under one state directory and no systemd needed.
# The fixture of tests/test_slurm_cluster.py (and handy by hand to try slurm/*.sh):
#     trap 'tests/slurm/local_slurm.sh purge /tmp/s' EXIT
#     eval "$(tests/slurm/local_slurm.sh start /tmp/s)"
#     sbatch --wait slurm/sft_tiny.sh
#
#   local_slurm.sh start  [DIR]   install packages if missing, write config, start munged,
#                                 slurmctld and slurmd, wait until the node is idle, then
#                                 print `export VAR=...` lines on stdout (logs go to stderr):
#                                     eval "$(local_slurm.sh start /tmp/my-slurm)"
#   local_slurm.sh env    [DIR]   print the same export lines for a running cluster
#   local_slurm.sh status [DIR]   show daemons (by recorded PID) and sinfo
#   local_slurm.sh stop   [DIR]   cancel jobs, end the daemons by their recorded PIDs
#   local_slurm.sh purge  [DIR]   stop, then delete DIR
#   local_slurm.sh install        only apt-get install the packages
#
# DIR defaults to $LOCAL_SLURM_DIR or /tmp/local-slurm. Must run as root.
# Knobs (env): LOCAL_SLURM_CTLD_PORT (6817), LOCAL_SLURM_SLURMD_PORT (6818),
#              LOCAL_SLURM_PARTITION (debug), LOCAL_SLURM_TIMEOUT (60 s per wait),
#              LOCAL_SLURM_MIN_JOB_AGE (5), LOCAL_SLURM_CRED_EXPIRE (5).
set -euo pipefail

CMD=${1:-start}
DIR=${2:-${LOCAL_SLURM_DIR:-/tmp/local-slurm}}
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LOCAL_SLURM_SLURMD_PORT:-6818}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
# `sbatch --wait` polls after 2 s and multiplies its interval by 4 while it is below
# MinJobAge/2: with MinJobAge<=5 it polls every 2 s; with the default 300 (or anything
# >= 6) a 3 s job returns after 10 s and a 12 s job after 42 s. 22.05 forces MinJobAge>=2
# (0 is NOT "never purge" despite the man page). Finished jobs stay visible >= 5 s.
MIN_JOB_AGE=${LOCAL_SLURM_MIN_JOB_AGE:-5}
# A requeued job waits cred_expire seconds (default 120) before it may start again
# (BeginTime = requeue time + cred_expire + 1). 5 keeps the preemption test short.
CRED_EXPIRE=${LOCAL_SLURM_CRED_EXPIRE:-5}
PKGS=(slurmctld slurmd slurm-client munge)

log() { echo "[local-slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
DIR=$(realpath -m "$DIR")            # absolute: the path ends up in slurm.conf
CONF=$DIR/slurm.conf
SOCK=$DIR/munge/munge.socket.2
PIDS=$DIR/pids
NODE=$(hostname -s)

install_pkgs() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
     command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  log "installing ${PKGS[*]} ..."
  # Keep the packages' postinst from starting the *system* munge/slurm services
  # (no systemd in containers; with systemd they would start needlessly).
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PKGS[@]}"; } >&2 || rc=$?
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt-get install failed (rc=$rc)"
}

# is_daemon PID NAME -> 0 if PID is a live (non-zombie) process whose argv[0] is NAME
# (guards against PID reuse; zombies count as gone when PID 1 is slow to reap them)
is_daemon() {
  local argv0 state
  [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] || return 1
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$state" ] && [ "$state" != Z ] || return 1
  argv0=$(tr '\0' '\n' < "/proc/$1/cmdline" 2>/dev/null | head -n1)
  [ "${argv0##*/}" = "$2" ]
}

# pid_alive NAME -> 0 if the PID recorded for NAME is still that daemon
pid_alive() {
  [ -s "$PIDS/$1.pid" ] && is_daemon "$(cat "$PIDS/$1.pid")" "$1"
}

# wait_for DESC CMD... : poll CMD until it succeeds or TIMEOUT passes
wait_for() {
  local desc=$1; shift
  local t0=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - t0 >= TIMEOUT )); then
      log "timed out waiting for $desc; last log lines:"
      tail -n 20 "$DIR"/log/* >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
}

# start_daemon NAME CMD... : start CMD detached (own session, no inherited fds,
# so `$(local_slurm.sh start)` does not hang) and record its PID.
start_daemon() {
  local name=$1; shift
  setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo $! > "$PIDS/$name.pid"
}

# adopt_pidfile NAME FILE : if `setsid` had to fork (caller has job control), $! is not
# the daemon; take the PID the daemon wrote itself.
adopt_pidfile() {
  local pid
  pid_alive "$1" && return 0
  pid=$(cat "$2" 2>/dev/null || true)
  if is_daemon "$pid" "$1"; then echo "$pid" > "$PIDS/$1.pid"; fi
  pid_alive "$1" || die "$1 is not running; see $DIR/log/$1.*"
}

print_env() {
  cat <<EOF
export SLURM_CONF=$CONF
export LOCAL_SLURM_DIR=$DIR
export LOCAL_SLURM_NODE=$NODE
export LOCAL_SLURM_PARTITION=$PARTITION
export LOCAL_SLURM_CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' "$CONF" | head -1)
EOF
}

write_conf() {
  # Real hardware line as slurmd sees it, e.g.
  # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
  local hw
  hw=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$NODE/")
  cat > "$CONF" <<EOF
# generated by local_slurm.sh -- single node, loopback only
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# run the scheduler every second (defaults: 60 s main loop, 30 s backfill), so a requeued
# job whose BeginTime has passed starts at once
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=$MIN_JOB_AGE
KillWait=5
Waittime=0
$hw NodeAddr=127.0.0.1 NodeHostname=$NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

ensure_hostname_resolves() {
  # slurm clients and MASTER_ADDR=$(scontrol show hostnames ...) need the node name to resolve
  if ! getent hosts "$NODE" >/dev/null; then
    log "'$NODE' does not resolve; adding '127.0.0.1 $NODE' to /etc/hosts (removed by stop)"
    echo "127.0.0.1 $NODE # local-slurm" >> /etc/hosts
    touch "$DIR/added-hosts-entry"
  fi
}

start() {
  install_pkgs
  export SLURM_CONF=$CONF
  if pid_alive slurmctld && pid_alive slurmd && pid_alive munged; then
    log "already running in $DIR"; print_env; return 0
  fi
  mkdir -p "$DIR"/{munge,ctld,spool,run,log} "$PIDS"
  chmod 755 "$DIR/munge"           # munged refuses group/world-writable dirs; o+x lets non-root clients reach the socket
  ensure_hostname_resolves

  # --- munge: private key + private socket, so a system munged is never touched
  if [ ! -s "$DIR/munge/munge.key" ]; then
    mungekey --create --keyfile="$DIR/munge/munge.key" 2>/dev/null ||
      dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 600 "$DIR/munge/munge.key"
  pid_alive munged || start_daemon munged munged --foreground --force \
      --socket="$SOCK" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed"
  wait_for "munged" bash -c "munge -n -S '$SOCK' | unmunge -S '$SOCK'" || die "munged did not come up"
  adopt_pidfile munged "$DIR/munge/munged.pid"

  # --- slurm
  write_conf
  pid_alive slurmctld || start_daemon slurmctld slurmctld -D -c -f "$CONF"
  wait_for "slurmctld" bash -c "scontrol ping | grep -q UP" || die "slurmctld did not come up"
  adopt_pidfile slurmctld "$DIR/run/slurmctld.pid"
  pid_alive slurmd || start_daemon slurmd slurmd -D -f "$CONF" -N "$NODE"
  wait_for "node $NODE idle" bash -c "sinfo -h -n '$NODE' -o %T | grep -qx idle" ||
    die "node did not become idle: $(sinfo -h -N -o '%N %T %E' 2>&1)"
  adopt_pidfile slurmd "$DIR/run/slurmd.pid"
  log "cluster up in $DIR (node $NODE, partition $PARTITION)"
  print_env
}

stop() {
  export SLURM_CONF=$CONF
  if pid_alive slurmctld; then
    scancel --partition="$PARTITION" >/dev/null 2>&1 || true
    local t0=$SECONDS
    while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && (( SECONDS - t0 < 15 )); do sleep 0.5; done
  fi
  local name pid i
  for name in slurmd slurmctld munged; do
    if pid_alive "$name"; then
      pid=$(cat "$PIDS/$name.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for i in $(seq 1 40); do is_daemon "$pid" "$name" || break; sleep 0.25; done
      if is_daemon "$pid" "$name"; then log "$name ($pid) ignored TERM; sending KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
      log "stopped $name (pid $pid)"
    fi
    rm -f "$PIDS/$name.pid"
  done
  if [ -e "$DIR/added-hosts-entry" ]; then
    sed -i '/ # local-slurm$/d' /etc/hosts
    rm -f "$DIR/added-hosts-entry"
  fi
}

status() {
  export SLURM_CONF=$CONF
  local name
  for name in munged slurmctld slurmd; do
    if pid_alive "$name"; then echo "$name: running (pid $(cat "$PIDS/$name.pid"))"; else echo "$name: not running"; fi
  done
  pid_alive slurmctld && sinfo
}

case "$CMD" in
  start)   start ;;
  env)     [ -f "$CONF" ] || die "no cluster config in $DIR"; print_env ;;
  status)  status ;;
  stop)    stop ;;
  purge)   stop; rm -rf "$DIR" ;;
  install) install_pkgs ;;
  *) die "usage: $0 {start|env|status|stop|purge|install} [DIR]" ;;
esac
