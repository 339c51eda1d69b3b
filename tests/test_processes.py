"""The processes a run starts under: the distributed types and launch choices the loop refuses (FSDP, DeepSpeed,
Megatron-LM, a parallelism config; XLA, NPU, XPU), before any work."""

import pytest
from conftest import cli, common

from pipeline.errors import ConfigError
from pipeline.processes import check_distributed


def test_fsdp_is_refused_before_any_work(workdir):
    # What `accelerate launch --use_fsdp` (or an `accelerate config` with FSDP) sets for the training process.
    result = cli(common(workdir, "trainer.epochs=1"), cwd=workdir, env={"ACCELERATE_USE_FSDP": "true"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: accelerate config chose FSDP; this pipeline supports one process, DDP" in result.stderr
    assert "accelerate launch --multi_gpu" in result.stderr and "Traceback" not in result.stderr
    assert not (workdir / "cache").exists() and not (workdir / "runs").exists()


@pytest.mark.parametrize(
    "variable,name",
    [
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
        ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"),
        ("ACCELERATE_USE_PARALLELISM_CONFIG", "a parallelism config"),
    ],
)
def test_other_sharding_launch_choices_are_refused(monkeypatch, variable, name):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match=f"accelerate config chose {name}"):
        check_distributed()


@pytest.mark.parametrize("kind", ["XLA", "MULTI_NPU", "MULTI_XPU", "FSDP", "DEEPSPEED"])
def test_a_state_of_another_distributed_type_is_refused(kind):
    # What a TPU host (XLA) or an NPU launch gives the training process: the state's own type, no variable.
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(distributed_type=DistributedType[kind])
    with pytest.raises(ConfigError, match=f"accelerate config chose {DistributedType[kind].value};"):
        check_distributed(state)
