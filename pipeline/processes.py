"""The processes of a run: Accelerate's process state, the distributed types this pipeline supports, and the
votes that keep every process on the same decision."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, parse_flag_from_env

from pipeline.errors import ConfigError

# The distributed types the loop supports; `accelerate launch` chooses the others by these variables (Accelerate
# itself only settles on them when the Accelerator is built, after the data is prepared).
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
LAUNCH_CHOICES = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
    "ACCELERATE_USE_PARALLELISM_CONFIG": "a parallelism config (tensor, context or sharded parallel)",
}


def start_processes(cfg, cpu: bool) -> PartialState:
    """Accelerate's process state (its process group, under a launcher), whose collectives fail after
    trainer.dist_timeout_s; the Accelerator built later shares it. A distributed type this pipeline does not
    support stops here, before any data is prepared or run folder made."""
    check_distributed()  # before the group: Accelerate's DeepSpeed setup would import deepspeed first
    # Without any accelerator, Accelerate only forms a multi-process (gloo) group when told cpu=True.
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=cfg.trainer.dist_timeout_s))
    check_distributed(state)
    return state


def check_distributed(state: PartialState | None = None) -> None:
    """One process, or DDP over CPUs or GPUs on one or several machines. FSDP, DeepSpeed and the like shard
    the model and optimizer: the weights saved would be one process's shard, and the checkpoints would not
    resume on another number of processes."""
    chosen = [name for var, name in LAUNCH_CHOICES.items() if parse_flag_from_env(var)]
    if state is not None and state.distributed_type not in SUPPORTED:
        chosen.append(state.distributed_type.value)
    if chosen:
        raise ConfigError(
            f"accelerate config chose {chosen[0]}; this pipeline supports one process, DDP on CPUs or GPUs and "
            f"multi-node DDP, and {chosen[0]} would save one process's shard of the model as its weights.\nFix: "
            f"run `accelerate config` again without it, or launch with `accelerate launch --multi_gpu "
            f"--num_processes N ...` (or --config_file launch/accelerate/multi_gpu.yaml)"
        )


def fewer_processes_than_asked(num_processes: int) -> str | None:
    """Accelerate's one-process launcher (`--cpu`, or a config whose distributed_type is NO or MULTI_CPU)
    starts one process whatever --num_processes says; asked for more, it sets MASTER_PORT, and torchrun's
    launcher (which starts them all) sets WORLD_SIZE. No variable carries the number asked for."""
    env = os.environ
    if num_processes == 1 and "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        return (
            "warning: `accelerate launch` was asked for more than one process (--num_processes/--num_machines), "
            "but its one-process launcher (--cpu, or a config with distributed_type NO or MULTI_CPU) started "
            "this one alone: processes=1. For N processes on the CPU: python launch/run.py --cpu "
            "--num_processes N ..., or --config_file launch/accelerate/cpu.yaml --num_processes N"
        )
    return None


def check_sync_batchnorm(cfg, state: PartialState) -> bool:
    """Whether BatchNorm layers become SyncBatchNorm: asked for, and more than one process to sync."""
    if not cfg.trainer.sync_batchnorm or state.num_processes == 1:
        return False
    if state.device.type != "cuda":
        raise ConfigError(
            f"trainer.sync_batchnorm=true needs CUDA devices; these {state.num_processes} processes run on "
            f"{state.device.type} (torch's SyncBatchNorm has no gloo/CPU path). Drop the option here: each "
            f"process then normalizes with the statistics of its own part of the batch."
        )
    return True


def processes_on_node(accelerator) -> int:
    # torchrun (and so `accelerate launch`) sets LOCAL_WORLD_SIZE; a single process has none.
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def all_agree(accelerator, decision: bool) -> bool:
    """True only when every process decided True."""
    if accelerator.num_processes == 1:
        return decision
    votes = torch.tensor(float(decision), device=accelerator.device)
    return accelerator.reduce(votes, reduction="sum").item() == accelerator.num_processes
