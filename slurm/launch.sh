# slurm/launch.sh -- the launch shared by every slurm/<stage>_<size>.sh; sourced, never run alone.
#
# A job script sets, then sources this file:
#   STAGE       sft | rm | ppo
#   CONFIG      the YAML config, relative to the repository root
#   OVERRIDES   (array, optional) key=value overrides after the config; the job script's own
#               arguments come last and win:  sbatch slurm/sft_6b.sh train.lr=1e-5
#   DEVICE      gpu (default: one task per GPU, NCCL) | cpu (the tasks of --ntasks, gloo)
#   PLAN_ARGS   (array, optional) extra flags for tools/plan_memory.py in a dry run
#
# Three ways to call a job script, always from the repository root:
#   sbatch slurm/ppo_175b.sh [key=value ...]      submit (logs/ must exist: mkdir -p logs)
#   bash slurm/ppo_175b.sh [key=value ...]        the same, creating logs/ first
#   DRY_RUN=1 bash slurm/ppo_175b.sh              print layout, srun command and memory plan;
#                                                 runs nothing, needs no Slurm (any machine)
#
# Knobs (environment; sbatch passes the submitting shell's environment to the job):
#   VENV=DIR            python from DIR/bin (default: ./.venv when present, else python3)
#   CONTAINER_IMAGE=IMG run the tasks in IMG with pyxis/enroot (srun --container-image); the
#                       checkout is mounted at the same path and put on PYTHONPATH, so IMG
#                       needs the dependencies only (an NGC PyTorch image + `pip install
#                       megatron-core==0.16.1 sentencepiece pyyaml`; see the README)
#   CONTAINER_MOUNTS    extra mounts for the container, "src:dst[,src:dst...]" (data, outputs)
#   NODES, GPUS_PER_NODE  dry run outside Slurm: preview another size than the #SBATCH lines
#   MASTER_PORT         rendezvous port (default 20000 + job id % 10000, as parallel.py)
#   MAX_REQUEUES        stop requeueing after this many restarts (default 20)
#   NCCL_* / GLOO_*     passed through; see the NCCL section below
#
# Preemption contract (see also megatron_rlhf/cli.py):
#   The job scripts ask for `--signal=B:USR1@<seconds>` (a warning before the time limit, sent
#   to this batch shell only) and `--requeue`. On USR1 or TERM this shell forwards USR1 to the
#   srun step; every rank finishes its step, all write one checkpoint, and the CLI exits 75
#   (EX_TEMPFAIL, "preempted at step N"). When the step exits 75, or ends in any failure
#   after such a signal, this shell runs `scontrol requeue $SLURM_JOB_ID`; the requeued job
#   runs the same command, which resumes from <output_dir>/checkpoints/latest. Exit 0 =
#   finished: no requeue. To preempt by hand: scancel --signal=USR1 --batch <jobid>.

_launch_die() { echo "[launch] error: $*" >&2; exit 1; }
_launch_say() { echo "[launch] $*"; }

[ -n "${STAGE:-}" ] || _launch_die "the job script must set STAGE (sft, rm or ppo)"
[ -n "${CONFIG:-}" ] || _launch_die "the job script must set CONFIG (a YAML file)"
case "$STAGE" in sft|rm|ppo) ;; *) _launch_die "STAGE=$STAGE: expected sft, rm or ppo" ;; esac
DEVICE=${DEVICE:-gpu}
case "$DEVICE" in gpu|cpu) ;; *) _launch_die "DEVICE=$DEVICE: expected gpu or cpu" ;; esac
declare -p OVERRIDES >/dev/null 2>&1 || OVERRIDES=()
declare -p PLAN_ARGS >/dev/null 2>&1 || PLAN_ARGS=()
ALL_OVERRIDES=("${OVERRIDES[@]}" "$@")

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOB_SCRIPT=$(realpath -- "${BASH_SOURCE[1]:-$0}")
cd "$ROOT" || _launch_die "cannot cd to $ROOT"
SHOWN_SCRIPT=${JOB_SCRIPT#"$ROOT"/}

# The value of an option in the job script's #SBATCH lines (long form, or -N/-n short form).
_sbatch_opt() {
  local long=$1 short=${2:-} v
  v=$(sed -n -E "s/^#SBATCH[[:space:]]+--$long(=|[[:space:]]+)([^[:space:]]+).*/\2/p" "$JOB_SCRIPT" | head -n1)
  if [ -z "$v" ] && [ -n "$short" ]; then
    v=$(sed -n -E "s/^#SBATCH[[:space:]]+-$short[[:space:]]*=?[[:space:]]*([^[:space:]]+).*/\1/p" "$JOB_SCRIPT" | head -n1)
  fi
  echo "$v"
}
_count() { local v=${1##*:}; v=${v%%(*}; echo "${v%%-*}"; }   # "h100:8" -> 8, "8(x2)" -> 8, "2-4" -> 2

JOB_NAME=${SLURM_JOB_NAME:-$(_sbatch_opt job-name J)}
JOB_NAME=${JOB_NAME:-$(basename "$JOB_SCRIPT" .sh)}

# --- not in an allocation and not a dry run: submit this very script --------------------
if [ -z "${SLURM_JOB_ID:-}" ] && [ "${DRY_RUN:-0}" = 0 ]; then
  command -v sbatch >/dev/null || _launch_die "sbatch not found: this is not a Slurm submit host (DRY_RUN=1 previews the launch)"
  mkdir -p logs
  _launch_say "submitting: sbatch $SHOWN_SCRIPT $*"
  exec sbatch "$JOB_SCRIPT" "$@"
fi

# --- preemption: catch the warning signal from here on (see the contract above) ------------
PREEMPT_SIGNAL=
SRUN_PID=
_launch_on_signal() {
  PREEMPT_SIGNAL=$1
  _launch_say "$(date -Is) got SIG$1: forwarding USR1 to the training step (checkpoint at the end of the current step)"
  [ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID" 2>/dev/null
}
if [ -n "${SLURM_JOB_ID:-}" ] && [ "${DRY_RUN:-0}" = 0 ]; then
  trap '_launch_on_signal USR1' USR1
  trap '_launch_on_signal TERM' TERM
fi

# --- the python that resolves the config here (and runs the tasks, unless in a container)
if [ -n "${VENV:-}" ]; then
  PYTHON=$VENV/bin/python
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PYTHON=$ROOT/.venv/bin/python
else
  PYTHON=$(command -v python3 || command -v python || echo python3)
fi

# --- nodes and tasks per node --------------------------------------------------------------
if [ -n "${SLURM_JOB_ID:-}" ]; then
  NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  if [ "$DEVICE" = gpu ]; then
    GPN=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-}}}
  elif [ -n "${SLURM_NTASKS:-}" ]; then
    GPN=$(( SLURM_NTASKS / NODES ))
  else
    GPN=${SLURM_NTASKS_PER_NODE:-1}
  fi
  WHERE="allocation"
else
  NODES_ENV=${NODES:-}
  NODES=${NODES:-$(_sbatch_opt nodes N)}
  NODES=$(_count "${NODES:-1}")
  if [ "$DEVICE" = gpu ]; then
    GPN=${GPUS_PER_NODE:-$(_sbatch_opt gpus-per-node)}
    GPN=${GPN:-$(_sbatch_opt ntasks-per-node)}
  else
    GPN=${GPUS_PER_NODE:-$(_sbatch_opt ntasks-per-node)}
    if [ -z "$GPN" ]; then n=$(_sbatch_opt ntasks n); [ -n "$n" ] && GPN=$(( $(_count "$n") / NODES )); fi
  fi
  WHERE="#SBATCH lines of $SHOWN_SCRIPT${NODES_ENV:+ and NODES=$NODES_ENV}${GPUS_PER_NODE:+ and GPUS_PER_NODE=$GPUS_PER_NODE}"
fi
GPN=$(_count "${GPN:-}")
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || _launch_die "cannot tell the node count (got '$NODES' from the $WHERE)"
[[ "$GPN" =~ ^[1-9][0-9]*$ ]] || _launch_die "cannot tell the tasks per node (got '$GPN' from the $WHERE): set --gpus-per-node or --ntasks-per-node (cpu: --ntasks)"

# --- tensor/pipeline sizes and output_dir: from the config + overrides ---------------------
RESOLVED=$("$PYTHON" slurm/resolve.py --stage "$STAGE" --config "$CONFIG" "${ALL_OVERRIDES[@]}" 2>"${TMPDIR:-/tmp}/launch-resolve.$$")
RESOLVE_RC=$?
RESOLVE_ERR=$(cat "${TMPDIR:-/tmp}/launch-resolve.$$" 2>/dev/null); rm -f "${TMPDIR:-/tmp}/launch-resolve.$$"
if [ "$RESOLVE_RC" = 0 ]; then
  read -r TP PP OUTPUT_DIR <<<"$RESOLVED"
  # Layouts the config accepts but the stage refuses at start (see resolve.py): say so now.
  RESOLVE_WARNINGS=$(sed -n 's/^warning: //p' <<<"$RESOLVE_ERR")
elif [ "$RESOLVE_RC" = 2 ] && [ -f "$CONFIG" ]; then
  _launch_die "invalid config: ${RESOLVE_ERR#error: }"
else
  # No usable python here (e.g. bare host, container mode) or no config file yet: read the
  # YAML and the overrides with sed. The tasks validate the config again when they start.
  [ -f "$CONFIG" ] || _launch_say "warning: $CONFIG does not exist (yet); the job would fail at start"
  _yaml() { [ -f "$CONFIG" ] && sed -n -E "s/^[[:space:]]*$1:[[:space:]]*([^[:space:]#]+).*/\1/p" "$CONFIG" | head -n1; }
  TP=$(_yaml tensor_model_parallel_size); PP=$(_yaml pipeline_model_parallel_size); OUTPUT_DIR=$(_yaml output_dir)
  for o in "${ALL_OVERRIDES[@]}"; do
    case "$o" in
      parallel.tensor_model_parallel_size=*) TP=${o#*=} ;;
      parallel.pipeline_model_parallel_size=*) PP=${o#*=} ;;
      output_dir=*) OUTPUT_DIR=${o#*=} ;;
    esac
  done
  TP=${TP:-1}; PP=${PP:-1}; OUTPUT_DIR=${OUTPUT_DIR:-runs/default}
fi
[[ "$TP" =~ ^[1-9][0-9]*$ && "$PP" =~ ^[1-9][0-9]*$ ]] || _launch_die "bad tp/pp: tp='$TP' pp='$PP'"

WORLD=$(( NODES * GPN ))
if (( WORLD % (TP * PP) )); then
  _launch_die "layout: nodes=$NODES x ${GPN} = $WORLD tasks is not a multiple of tp x pp = $TP x $PP = $(( TP * PP )); change the node count or parallel.tensor_model_parallel_size / parallel.pipeline_model_parallel_size"
fi
DP=$(( WORLD / (TP * PP) ))

# --- environment of the tasks --------------------------------------------------------------
if [ -n "${SLURM_JOB_ID:-}" ]; then
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
  MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}
  export MASTER_ADDR MASTER_PORT
fi
export PYTHONUNBUFFERED=1
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  if [ -n "$CPUS_PER_TASK" ]; then OMP_NUM_THREADS=$CPUS_PER_TASK
  elif [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then OMP_NUM_THREADS=$(( SLURM_CPUS_ON_NODE / GPN > 0 ? SLURM_CPUS_ON_NODE / GPN : 1 ))
  else OMP_NUM_THREADS=1; fi
fi
export OMP_NUM_THREADS

if [ "$DEVICE" = gpu ]; then
  # --- NCCL / InfiniBand ---------------------------------------------------------------------
  # Megatron overlaps TP/SP communication with compute only if kernels run in issue order.
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  # A failed or timed-out collective tears the process down (and srun --kill-on-bad-exit the
  # job) instead of hanging every rank until the job's time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}            # INFO once, to see which HCAs/rings NCCL picked
  # Cluster-specific: export these before sbatch when your cluster's docs say so (NCCL picks
  # sensible defaults when they are unset). `ibstat` / `ip -br link` show the names.
  #   NCCL_IB_HCA=mlx5_0,mlx5_1,...   the compute-fabric HCAs only (skip storage/Ethernet ports)
  #   NCCL_SOCKET_IFNAME=ib0          bootstrap/socket interface (or "^lo,docker" = all but these)
  #   GLOO_SOCKET_IFNAME=ib0          the same for gloo groups (checkpointing); no "^" syntax
  #   NCCL_IB_GID_INDEX=3             RoCE fabrics only
  #   NCCL_IB_TIMEOUT=22              longer IB retransmit timeout on very large jobs
  #   NCCL_NVLS_ENABLE=0              if NVLink SHARP misbehaves on your driver/fabric manager
fi

# --- the srun command ----------------------------------------------------------------------
SRUN=(srun --nodes="$NODES" --ntasks-per-node="$GPN" --kill-on-bad-exit=1)
[ -n "$CPUS_PER_TASK" ] && SRUN+=(--cpus-per-task="$CPUS_PER_TASK")   # not inherited since Slurm 22.05
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  SRUN+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$ROOT:$ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}" --container-workdir="$ROOT")
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  TASK_PYTHON=python
else
  TASK_PYTHON=$PYTHON
fi
CMD=("${SRUN[@]}" "$TASK_PYTHON" -m megatron_rlhf "$STAGE" --config "$CONFIG" "${ALL_OVERRIDES[@]}")

_show_cmd() { printf '%q ' "${CMD[@]}"; echo; }

if [ "${DRY_RUN:-0}" != 0 ]; then
  _launch_say "DRY_RUN: $JOB_NAME ($SHOWN_SCRIPT), nothing is submitted or started; sizes from the $WHERE"
fi
echo "layout: nodes=$NODES gpus_per_node=$GPN tp=$TP pp=$PP dp=$DP"
if [ "$DEVICE" = cpu ]; then
  _launch_say "device: cpu (gloo), $GPN processes per node"
fi
_launch_say "output_dir: $OUTPUT_DIR (a rerun or requeue resumes from $OUTPUT_DIR/checkpoints/latest)"
if [ -n "${SLURM_JOB_ID:-}" ]; then
  _launch_say "rendezvous: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
else
  _launch_say "rendezvous: MASTER_ADDR=<first host of \$SLURM_JOB_NODELIST> MASTER_PORT=${MASTER_PORT:-20000 + job id % 10000}"
fi
_launch_say "env: OMP_NUM_THREADS=$OMP_NUM_THREADS $(env | grep -E '^(CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_ASYNC_ERROR_HANDLING|NCCL_[A-Z_]+|GLOO_SOCKET_IFNAME)=' | sort | tr '\n' ' ')"
_launch_say "command: $(_show_cmd)"
while IFS= read -r w; do
  [ -n "$w" ] && _launch_say "WARNING: $w"
done <<<"${RESOLVE_WARNINGS:-}"

if [ "${DRY_RUN:-0}" != 0 ]; then
  PLAN_RC=0
  if [ "$DEVICE" = cpu ]; then
    _launch_say "memory plan: skipped (cpu job)"
  elif [ ! -f tools/plan_memory.py ]; then
    _launch_say "memory plan: tools/plan_memory.py is not in this checkout (skipped)"
  elif [ "$RESOLVE_RC" != 0 ]; then
    _launch_say "memory plan: skipped (the config could not be resolved with $PYTHON)"
  else
    MERGED=$(mktemp --tmpdir --suffix=.yaml)  # GNU mktemp: a fresh file under $TMPDIR (or /tmp)
    "$PYTHON" slurm/resolve.py --stage "$STAGE" --config "$CONFIG" --write "$MERGED" "${ALL_OVERRIDES[@]}" >/dev/null 2>&1
    PLAN=("$PYTHON" tools/plan_memory.py --config "$MERGED" --stage "$STAGE" --nodes "$NODES" --gpus-per-node "$GPN" "${PLAN_ARGS[@]}")
    _launch_say "memory plan: tools/plan_memory.py --config <$CONFIG + overrides> --stage $STAGE --nodes $NODES --gpus-per-node $GPN ${PLAN_ARGS[*]}"
    "${PLAN[@]}"
    PLAN_RC=$?
    rm -f "$MERGED"
    [ "$PLAN_RC" = 0 ] || _launch_say "warning: the memory plan says this layout does not fit (exit $PLAN_RC)"
  fi
  exit "$PLAN_RC"
fi

# --- run it (inside the allocation) --------------------------------------------------------
_launch_say "$(date -Is) job ${SLURM_JOB_ID} ($JOB_NAME) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}"
if [ -n "$PREEMPT_SIGNAL" ]; then
  # The warning came while this shell was still resolving the launch: nothing to checkpoint.
  RC=75
else
  # In the background, so that this shell can act on a signal while the step runs (bash runs
  # traps only between commands; `wait` returns as soon as a trapped signal arrives).
  "${CMD[@]}" &
  SRUN_PID=$!
  [ -n "$PREEMPT_SIGNAL" ] && kill -USR1 "$SRUN_PID" 2>/dev/null
  while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
  wait "$SRUN_PID"
  RC=$?
fi
trap - USR1 TERM

if [ "$RC" = 0 ]; then
  _launch_say "$(date -Is) finished"
  exit 0
fi
if [ "$RC" = 75 ] || [ -n "$PREEMPT_SIGNAL" ]; then
  RESTARTS=${SLURM_RESTART_COUNT:-0}
  if (( RESTARTS >= ${MAX_REQUEUES:-20} )); then
    _launch_say "preempted (exit $RC) after $RESTARTS restarts = MAX_REQUEUES: not requeueing; resubmit to resume"
    exit 75
  fi
  _launch_say "$(date -Is) preempted (exit $RC${PREEMPT_SIGNAL:+, SIG$PREEMPT_SIGNAL}): requeueing job $SLURM_JOB_ID; it resumes from $OUTPUT_DIR/checkpoints/latest"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0   # Slurm ends this shell and starts the job again (same id, same log file)
  fi
  _launch_say "scontrol requeue failed: resubmit the same command to resume"
  exit 75
fi
_launch_say "$(date -Is) the training step failed (exit $RC)"
exit "$RC"
