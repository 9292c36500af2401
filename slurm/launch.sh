# shellcheck shell=bash
# megapix: the launch helper shared by slurm/train.sbatch, slurm/train_xl.sbatch and slurm/extract.sbatch.
# Source it from a batch script (it defines functions and exports the job's environment; it runs nothing
# by itself):
#
#   source "$MEGAPIX_ROOT/slurm/launch.sh"
#   megapix_train                                  # train.py with the variables below, requeue on exit 75
#   megapix_launch -m megapix extract --out F ...  # any program, one rank per task, no requeue
#
# Variables (environment; every one has a default; see slurm/README.md for the full table):
#   MEGAPIX_ROOT   repository root                        default: $SLURM_SUBMIT_DIR
#   PYTHON         interpreter with megapix's deps         default: python
#   LAUNCHER       srun | torchrun | deepspeed             default: srun (one task per GPU, see README)
#   GPUS_PER_NODE  ranks per node for torchrun/deepspeed   default: GPUs SLURM gave the job, else tasks per node
#   MEGAPIX_MASTER_ADDR / MEGAPIX_MASTER_PORT  rendezvous   default: first node of the job, 20000 + SLURM_JOB_ID % 20000
#                  (or, if that port is in use on the first node, a free one)
#                  (a MASTER_ADDR/PORT inherited from the submitting shell is ignored: it names another job's host)
#   MAX_REQUEUES   give up requeueing after this many     default: 20 (compared with SLURM_RESTART_COUNT)
#   REQUEUE_ON_TERM=1  treat SIGTERM to the batch shell as a preemption too (clusters that preempt with
#                  TERM + GraceTime); default 0: TERM means "cancelled", the trainer saves but nothing requeues
#
# The trainer's contract (megapix/engine.py): on SIGUSR1/SIGTERM, or when --time-budget runs out, every
# rank saves a checkpoint at the next step boundary and the process exits 75 ("saved, please requeue").

megapix_log() { echo "megapix-slurm: $*" >&2; }

# ---------------------------------------------------------------------------------------------------
# Environment of the job. Runs when this file is sourced.
# ---------------------------------------------------------------------------------------------------
if [ -z "${SLURM_JOB_ID:-}" ]; then
    megapix_log "not inside a SLURM job (SLURM_JOB_ID is unset): submit with sbatch"
    return 2 2>/dev/null || exit 2
fi

: "${MEGAPIX_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${PYTHON:=python}"
: "${LAUNCHER:=srun}"
: "${MAX_REQUEUES:=20}"
: "${REQUEUE_ON_TERM:=0}"
: "${USER:=$(id -un)}"
export MEGAPIX_ROOT PYTHON LAUNCHER USER

if [ ! -f "$MEGAPIX_ROOT/megapix/train.py" ]; then
    megapix_log "MEGAPIX_ROOT=$MEGAPIX_ROOT is not the megapix repository (no megapix/train.py);" \
        "submit from the repository root or set MEGAPIX_ROOT"
    exit 2
fi
# The ranks import the installed megapix (`pip install -e .`, which maps kernels/ to megapix.kernels): check that it
# is this checkout. (Putting the checkout on PYTHONPATH instead would also expose kernels/ as the top-level
# `kernels`, the name of Hugging Face's package.)
installed="$(cd / && "$PYTHON" -c 'import importlib.util as u; s = u.find_spec("megapix"); print(s.origin if s else "")' \
    2>/dev/null || true)"
if [ -z "$installed" ] || [ "$(realpath "$(dirname "$installed")")" != "$(realpath "$MEGAPIX_ROOT/megapix")" ]; then
    megapix_log "$PYTHON does not import megapix from MEGAPIX_ROOT=$MEGAPIX_ROOT (${installed:-not installed}):" \
        "run $PYTHON -m pip install -e $MEGAPIX_ROOT"
    exit 2
fi
export PYTHONUNBUFFERED=1

# Rendezvous: the first host of the allocation and a port derived from the job id. The trainer computes the
# same two values itself from SLURM's variables when they are not set (megapix/parallel/launch.py); exporting
# them here makes all three launchers agree. A requeued job keeps its id, hence its port.
MASTER_ADDR="${MEGAPIX_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
MASTER_PORT="${MEGAPIX_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
# The derived port can be held on that host: by another job sharing the node, a service, or an outgoing connection
# (ports from 32768 are Linux's ephemeral range). The batch script runs on the first host, where rank 0 listens, so
# it checks the port there and otherwise takes one the OS says is free; every rank of every launcher gets it below.
if [ -z "${MEGAPIX_MASTER_PORT:-}" ] && [ -z "${MEGAPIX_MASTER_ADDR:-}" ]; then
    free_port="$("$PYTHON" -c '
import socket, sys
for port in (int(sys.argv[1]), 0):
    try:
        with socket.socket() as s:
            s.bind(("", port))
            print(s.getsockname()[1])
            break
    except OSError:
        pass
' "$MASTER_PORT" 2>/dev/null || true)"
    if [ -n "$free_port" ] && [ "$free_port" != "$MASTER_PORT" ]; then
        megapix_log "port $MASTER_PORT is in use on $(hostname -s): rendezvous on port $free_port instead" \
            "(MEGAPIX_MASTER_PORT sets one)"
        MASTER_PORT=$free_port
    fi
fi
export MASTER_ADDR MASTER_PORT
# Ranks come from srun/torchrun/deepspeed inside the job; a RANK/WORLD_SIZE inherited from the submitting shell
# (sbatch exports the whole environment) would make every task claim the same rank of the wrong world.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

# Ranks per node. srun: whatever --ntasks-per-node says (one task per GPU). torchrun/deepspeed start the
# ranks themselves and need the number: the GPUs SLURM gave us, else the tasks per node (CPU runs).
if [ -z "${GPUS_PER_NODE:-}" ] || [ "${GPUS_PER_NODE}" = 0 ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ]; then
        GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    else
        GPUS_PER_NODE=0
    fi
fi
if [ "$GPUS_PER_NODE" != 0 ]; then
    MEGAPIX_PROCS_PER_NODE=$GPUS_PER_NODE
else
    MEGAPIX_PROCS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / ${SLURM_JOB_NUM_NODES:-1} ))}
    MEGAPIX_PROCS_PER_NODE=${MEGAPIX_PROCS_PER_NODE%%(*}  # "2(x4)" -> "2"
fi
export GPUS_PER_NODE MEGAPIX_PROCS_PER_NODE

# Node-local compile caches, one per job. Triton's cache (and Inductor's) on a shared NFS/Lustre home races
# between nodes and jobs (partial files, stale locks); ${TMPDIR:-/tmp} is local on every node. The path is
# computed here on the first node and created by Triton on each node on first use.
MEGAPIX_NODE_TMP="${TMPDIR:-/tmp}/${USER}"
: "${TRITON_CACHE_DIR:=$MEGAPIX_NODE_TMP/triton-$SLURM_JOB_ID}"
: "${TORCHINDUCTOR_CACHE_DIR:=$MEGAPIX_NODE_TMP/inductor-$SLURM_JOB_ID}"
export TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null || true

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# NCCL. Defaults that are safe everywhere; the rest depend on the cluster's network and are left as notes.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a dead peer fails the job
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"              # (name before torch 2.2)
# export NCCL_SOCKET_IFNAME=ib0,eth0     # the interface(s) for NCCL's bootstrap/socket traffic; '^lo,docker'
#                                        # excludes; set it when nodes have several NICs and the default picks
#                                        # one that isn't routed between nodes
# export NCCL_IB_HCA=mlx5_0,mlx5_1       # InfiniBand/RoCE adapters to use (default: all found)
# export NCCL_IB_GID_INDEX=3             # RoCE v2 usually needs this
# export NCCL_IB_DISABLE=1               # no InfiniBand: fall back to sockets
# export NCCL_IB_TIMEOUT=22              # larger on big/congested fabrics
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA distance
# export NCCL_DEBUG=INFO                 # NCCL_DEBUG_SUBSYS=INIT,NET: which transport/NIC was chosen
# export TORCH_NCCL_BLOCKING_WAIT=1      # alternative to async error handling (slower)
# export NCCL_CROSS_NIC=0 NCCL_NSOCKS_PERTHREAD=4 NCCL_SOCKET_NTHREADS=2   # tuning for TCP-only clusters

megapix_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: launcher=$LAUNCHER" \
    "nodes=${SLURM_JOB_NUM_NODES:-1} ranks/node=$MEGAPIX_PROCS_PER_NODE master=$MASTER_ADDR:$MASTER_PORT" \
    "python=$PYTHON root=$MEGAPIX_ROOT"

# ---------------------------------------------------------------------------------------------------
# Signals: the batch shell is what SLURM signals (--signal=B:USR1@N, `scancel --signal=USR1 --batch`).
# It forwards the signal to the tasks of the job's running steps; the trainer saves and exits 75.
# ---------------------------------------------------------------------------------------------------
MEGAPIX_GOT_USR1=0
MEGAPIX_GOT_TERM=0
MEGAPIX_CHILD=""
MEGAPIX_SIGNAL_TIME=""

megapix_forward() {  # megapix_forward SIGNAL
    local sig=$1 steps step
    MEGAPIX_SIGNAL_TIME=${MEGAPIX_SIGNAL_TIME:-$(date +%s)}
    # Every step of this job but the batch script itself: srun's tasks (LAUNCHER=srun/deepspeed) are the
    # trainer's ranks; torchrun's tasks are the agents, which pass USR1 on to their workers (see below).
    steps=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -Ev '\.(batch|extern|interactive)$')
    if [ -n "$steps" ]; then
        for step in $steps; do
            megapix_log "forwarding SIG$sig to step $step"
            scancel --signal="$sig" "$step" || true
        done
    elif [ -n "$MEGAPIX_CHILD" ]; then
        megapix_log "forwarding SIG$sig to the launcher (pid $MEGAPIX_CHILD)"
        kill -s "$sig" "$MEGAPIX_CHILD" 2>/dev/null || true
    fi
}
megapix_on_usr1() { MEGAPIX_GOT_USR1=1; megapix_log "SIGUSR1: preemption warning, asking the trainer to save"; megapix_forward USR1; }
megapix_on_term() { MEGAPIX_GOT_TERM=1; megapix_log "SIGTERM: stopping (the trainer saves; no requeue unless REQUEUE_ON_TERM=1)"; megapix_forward TERM; }
trap megapix_on_usr1 USR1
trap megapix_on_term TERM

# torchrun: let the agent catch USR1 and pass it to its workers instead of dying from it; give the workers
# time to finish the save before the agent kills them.
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
: "${TORCHRUN_SHUTDOWN_TIMEOUT:=600}"

# ---------------------------------------------------------------------------------------------------
# megapix_launch PROGRAM [ARGS...]: start PROGRAM (a .py file, or `-m module`) once per rank with $LAUNCHER,
# wait for it while relaying signals, and set MEGAPIX_RC to its exit code (also returned).
# ---------------------------------------------------------------------------------------------------
megapix_launch() {
    local -a cmd
    local nodes=${SLURM_JOB_NUM_NODES:-1} launcher=$LAUNCHER
    if [ "$launcher" = deepspeed ] && [ "$1" = -m ]; then
        megapix_log "LAUNCHER=deepspeed cannot run a module (-m $2) through its slurm runner; using srun"
        launcher=srun
    fi
    case "$launcher" in
    srun)
        # One task per GPU as the allocation says (--ntasks-per-node); each task is one rank and reads
        # SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. No --kill-on-bad-exit: ranks leave with 75 one by one
        # after a save, and killing the slower ones could cut a checkpoint short (a crashed rank is caught by
        # the collectives' timeout / TORCH_NCCL_ASYNC_ERROR_HANDLING instead).
        cmd=(srun ${MEGAPIX_SRUN_WAIT:+--wait="$MEGAPIX_SRUN_WAIT"} "$PYTHON" -u "$@")
        ;;
    torchrun)
        # One torchrun agent per node (all the node's CPUs), c10d rendezvous on the first node.
        cmd=(srun ${MEGAPIX_SRUN_WAIT:+--wait="$MEGAPIX_SRUN_WAIT"} --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1
             --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
             "$PYTHON" -m torch.distributed.run --nnodes="$nodes" --nproc-per-node="$MEGAPIX_PROCS_PER_NODE"
             --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
             --max-restarts=0 --shutdown-timeout="$TORCHRUN_SHUTDOWN_TIMEOUT" "$@")
        ;;
    deepspeed)
        # DeepSpeed's runner with its slurm backend: it runs `srun -n <ranks>` itself (no ssh/pdsh) from a
        # hostfile of the allocation's nodes; the ranks read SLURM_PROCID like under plain srun.
        local hostfile="$MEGAPIX_NODE_TMP/hostfile-$SLURM_JOB_ID"
        mkdir -p "$MEGAPIX_NODE_TMP"
        scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$MEGAPIX_PROCS_PER_NODE/" >"$hostfile"
        cmd=("$PYTHON" -u -m deepspeed.launcher.runner --launcher slurm --hostfile "$hostfile" --force_multi
             --no_ssh_check --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
             ${MEGAPIX_SRUN_WAIT:+"--launcher_args=--wait=$MEGAPIX_SRUN_WAIT"} "$@")
        ;;
    *)
        megapix_log "unknown LAUNCHER=$launcher (srun, torchrun or deepspeed)"
        MEGAPIX_RC=2
        return 2
        ;;
    esac
    MEGAPIX_LAUNCH_TIME=$(date +%s)
    megapix_log "running: ${cmd[*]}"
    "${cmd[@]}" &
    MEGAPIX_CHILD=$!
    # A trapped signal interrupts `wait`; keep waiting until the launcher is really gone, then collect its
    # status (bash remembers it).
    while kill -0 "$MEGAPIX_CHILD" 2>/dev/null; do
        wait "$MEGAPIX_CHILD"
    done
    wait "$MEGAPIX_CHILD"
    MEGAPIX_RC=$?
    MEGAPIX_CHILD=""
    megapix_log "$launcher exited with code $MEGAPIX_RC"
    return "$MEGAPIX_RC"
}

# Did the trainer save after the signal? For launchers that do not pass exit code 75 through (torchrun
# reports any worker failure as 1), a checkpoint `latest` written after the signal counts as "saved".
megapix_saved_after_signal() {  # megapix_saved_after_signal OUT_DIR
    local latest="$1/checkpoints/latest"
    [ -n "$MEGAPIX_SIGNAL_TIME" ] && [ -f "$latest" ] && [ "$(stat -c %Y "$latest")" -ge "$MEGAPIX_SIGNAL_TIME" ]
}

# megapix_finish_or_requeue OUT_DIR: after megapix_launch, requeue the job if the trainer saved and asked for
# it (exit 75) and the job was not cancelled; exit the batch script with a meaningful code.
megapix_finish_or_requeue() {
    local out=$1 rc=$MEGAPIX_RC restarts=${SLURM_RESTART_COUNT:-0} state
    if [ "$rc" != 75 ] && [ "$LAUNCHER" = torchrun ] && [ "$rc" != 0 ] && megapix_saved_after_signal "$out"; then
        megapix_log "torchrun exited $rc but a checkpoint was saved after the signal: treating it as 75"
        rc=75
    fi
    if [ "$rc" -gt 128 ] && [ -s "${MEGAPIX_PEER_LOST_FILE:-}" ]; then
        # A rank was killed (OOM killer, a node going away) or hung and srun ended it: the others said so
        # (parallel/watchdog.py) and exited 75; srun's own code is the killed rank's. Nothing new was saved; the
        # rerun resumes from the last complete checkpoint. (A rank that failed with an error exits 1: no
        # requeue, the same error would come back. torchrun reports any worker's failure as 1 too.)
        megapix_log "ranks lost a peer ($(head -n 1 "$MEGAPIX_PEER_LOST_FILE")): treating exit $rc as 75"
        rc=75
    fi
    if [ "$rc" = 138 ] && [ "$MEGAPIX_GOT_USR1" = 1 ]; then
        # 128 + SIGUSR1: the signal came while the trainer was still starting, before its handler was
        # installed. Nothing new to save; the previous checkpoint (if any) is where the rerun starts.
        megapix_log "the trainer died of SIGUSR1 before it could save (still starting): requeueing from the previous checkpoint"
        rc=75
    fi
    if [ "$rc" != 75 ]; then
        exit "$rc"
    fi
    if [ "$MEGAPIX_GOT_TERM" = 1 ] && [ "$REQUEUE_ON_TERM" != 1 ]; then
        megapix_log "checkpoint saved; the job got SIGTERM (cancelled): not requeueing"
        exit 75
    fi
    state=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*')
    case "$state" in
    JobState=CANCELLED*)
        megapix_log "checkpoint saved; the job is cancelled: not requeueing"
        exit 75
        ;;
    esac
    if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
        megapix_log "checkpoint saved; already requeued $restarts times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing"
        exit 75
    fi
    megapix_log "checkpoint saved: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $MAX_REQUEUES)"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        megapix_log "scontrol requeue failed (job submitted with --no-requeue, or JobRequeue=0?)"
        exit 75
    fi
    exit 0
}

# ---------------------------------------------------------------------------------------------------
# megapix_train: megapix/train.py from the variables below (unset ones are left to --config/the defaults).
#   MODEL DATA CONFIG DS_CONFIG MAX_STEPS GLOBAL_BATCH MICRO_BATCH SEED OUT SAVE_EVERY TIME_BUDGET
#   TP PP ZERO_STAGE RESUME(=1) EXTRA_ARGS EXIT_WAIT(=600)
# ---------------------------------------------------------------------------------------------------
megapix_train() {
    local -a args=()
    : "${OUT:=runs/${SLURM_JOB_NAME:-megapix}-${SLURM_JOB_ID}}"  # the job id survives requeues
    : "${RESUME:=1}"
    # A hung rank never exits: srun ends the tasks still running EXIT_WAIT s after the first one exited (the
    # others exit 75 once --collective-timeout runs out). Ranks that save together exit seconds apart; at the end
    # of a run rank 0 alone writes samples.png (raise EXIT_WAIT if that takes longer).
    : "${EXIT_WAIT:=600}"
    MEGAPIX_SRUN_WAIT=$EXIT_WAIT
    # Where a rank that lost a peer says so (one line each): megapix_finish_or_requeue reads it.
    export MEGAPIX_PEER_LOST_FILE="$OUT/.peer-lost-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"
    [ -n "${CONFIG:-}" ] && args+=(--config "$CONFIG")
    [ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
    [ -n "${DATA:-}" ] && args+=(--data "$DATA")
    [ -n "${DS_CONFIG:-}" ] && args+=(--deepspeed_config "$DS_CONFIG")
    [ -n "${MAX_STEPS:-}" ] && args+=(--max-steps "$MAX_STEPS")
    [ -n "${GLOBAL_BATCH:-}" ] && args+=(--global-batch "$GLOBAL_BATCH")
    [ -n "${MICRO_BATCH:-}" ] && args+=(--micro-batch "$MICRO_BATCH")
    [ -n "${SEED:-}" ] && args+=(--seed "$SEED")
    [ -n "${SAVE_EVERY:-}" ] && args+=(--save-every "$SAVE_EVERY")
    [ -n "${TIME_BUDGET:-}" ] && args+=(--time-budget "$TIME_BUDGET")
    [ -n "${TP:-}" ] && args+=(--tensor-parallel "$TP")
    [ -n "${PP:-}" ] && args+=(--pipeline-parallel "$PP")
    [ -n "${ZERO_STAGE:-}" ] && args+=(--zero-stage "$ZERO_STAGE")
    [ "$RESUME" = 1 ] && args+=(--resume-if-exists)  # continues the run in OUT if there is one, or starts it
    args+=(--out "$OUT")
    # shellcheck disable=SC2206  # EXTRA_ARGS is split on spaces on purpose
    [ -n "${EXTRA_ARGS:-}" ] && args+=($EXTRA_ARGS)
    if [ "$MEGAPIX_GOT_USR1" = 1 ]; then
        megapix_log "SIGUSR1 arrived before the trainer started: not starting it"
        MEGAPIX_RC=75
    else
        megapix_launch "$MEGAPIX_ROOT/megapix/train.py" "${args[@]}"
    fi
    megapix_finish_or_requeue "$OUT"
}
