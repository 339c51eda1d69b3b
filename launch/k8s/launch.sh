#!/bin/bash
# Container command of every pod of the Kubeflow PyTorchJob (launch/k8s/pytorchjob.yaml):
# turns the operator's environment into one `accelerate launch` per pod (one process per GPU).
#   bash launch/k8s/launch.sh recipe=NAME data.root=/data data.cache_dir=/cache output_dir=/runs
# Print the commands instead of running them:
#   DRY_RUN=1 MASTER_ADDR=job-master-0 MASTER_PORT=23456 WORLD_SIZE=2 RANK=1 GPUS_PER_NODE=8 \
#     bash launch/k8s/launch.sh recipe=NAME
#
# Environment: MASTER_ADDR, MASTER_PORT, WORLD_SIZE (pods), RANK (pod index) come from the
# operator. GPUS_PER_NODE defaults to the `nvidia-smi -L` count, else 1. RUN_NAME, when set,
# becomes run_name= so a restarted pod writes to the same run directory. PREPARE=0 skips
# the data preparation on rank 0 (when the shards were built beforehand).
set -euo pipefail

# Commands below use repository-relative paths.
cd "$(dirname "$0")/../.."

DRY_RUN="${DRY_RUN:-0}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-launch/accelerate/multi_node.yaml}"

: "${MASTER_ADDR:?not set: run inside a PyTorchJob (or set it for DRY_RUN=1)}"
: "${MASTER_PORT:?}" "${WORLD_SIZE:?}" "${RANK:?}"
# Newer training-operator releases also set PET_NNODES / PET_NODE_RANK; they are the pod
# count and index even when the spec sets nprocPerNode (WORLD_SIZE is then pods*nprocPerNode).
num_machines="${PET_NNODES:-$WORLD_SIZE}"
machine_rank="${PET_NODE_RANK:-$RANK}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$GPUS_PER_NODE" -gt 0 ]] || GPUS_PER_NODE=1
fi

# Print a command, shell-quoted, on one line.
show() {
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
}

train_args=("$@")
if [[ -n "${RUN_NAME:-}" ]]; then
    # First, so an explicit run_name= among the arguments still wins.
    train_args=("run_name=$RUN_NAME" "$@")
fi

# launch/run.py is `accelerate launch` that exits with the training's own code (143: stopped on
# SIGTERM with a checkpoint saved, which the PyTorchJob's restartPolicy ExitCode retries; 1, 2, 3
# are final) instead of 1 and a launcher traceback for every failure.
cmd=(python launch/run.py --config_file "$ACCELERATE_CONFIG"
    --num_machines "$num_machines" --machine_rank "$machine_rank"
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
    --num_processes "$((num_machines * GPUS_PER_NODE))"
    launch/train.py "${train_args[@]}")

# Only rank 0 builds the shards (into the shared cache volume). The other pods meanwhile wait
# in the rendezvous for rank 0 (torch's static rendezvous gives up after 10 minutes and the
# pod is restarted); for a longer preparation build the shards first and set PREPARE=0.
if [[ "$machine_rank" == 0 && "${PREPARE:-1}" != 0 ]]; then
    prepare=(python launch/prepare.py "$@")
    if [[ "$DRY_RUN" == 1 ]]; then show "${prepare[@]}"; else "${prepare[@]}"; fi
fi

if [[ "$DRY_RUN" == 1 ]]; then
    show "${cmd[@]}"
    exit 0
fi
# On SIGTERM torch's launcher waits this long for the training processes to save and exit (its
# default: 30 s); keep it under the pod's terminationGracePeriodSeconds.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"
# exec so that the pod's SIGTERM reaches the launcher directly.
exec "${cmd[@]}"
