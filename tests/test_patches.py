"""pipeline/patches.py: with the installed Accelerate every patch applies and keeps Accelerate's results;
a moved target disables its patch with one log line instead of breaking the run; apply() is idempotent."""

import inspect
import subprocess
import sys
from types import SimpleNamespace

import accelerate
import accelerate.optimizer
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT, environment

from pipeline import patches
from pipeline.errors import ConfigError


@pytest.fixture(autouse=True)
def restored(monkeypatch):
    """Each test starts from Accelerate as installed and leaves it so (monkeypatch restores these)."""
    for name in ("is_lomo_available", "inspect"):
        monkeypatch.setattr(accelerate.optimizer, name, getattr(accelerate.optimizer, name))
    monkeypatch.setattr(patches, "active", dict.fromkeys(patches.active, False))
    monkeypatch.delenv(patches.ENV, raising=False)
    yield
    AcceleratorState._reset_state(True)


def apply() -> tuple[dict, list[str]]:
    lines = []
    return patches.apply(lines.append), lines


def prepared(accumulation: int = 1, accelerator_class=None):
    torch.manual_seed(0)
    accelerator = (accelerator_class or patches.Accelerator)(cpu=True, gradient_accumulation_steps=accumulation)
    model = torch.nn.Linear(4, 2)
    return (accelerator, *accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1)))


def test_every_patch_applies_to_the_installed_accelerate():
    # Fails when an Accelerate inside the pinned range (pyproject.toml) moved a target: fix the patch or drop it.
    active, lines = apply()
    assert active == {"lomo": True, "signature": True, "backward": True}, lines
    assert lines == []


def test_lomo_answer_is_asked_once():
    original = accelerate.optimizer.is_lomo_available
    apply()
    cached = accelerate.optimizer.is_lomo_available
    assert cached.__wrapped__ is original
    accelerator, model, optimizer = prepared()
    for _ in range(3):  # the optimizer step asks twice a step: once in all
        accelerator.backward(model(torch.randn(8, 4)).square().mean())
        optimizer.step()
    assert cached.cache_info().misses == 1 and cached.cache_info().hits >= 5
    assert cached() == original()


def test_signature_is_cached_and_still_right():
    apply()
    cached = accelerate.optimizer.inspect.signature
    accelerator, model, optimizer = prepared()
    before = cached.cache_info()
    for _ in range(3):
        accelerator.backward(model(torch.randn(8, 4)).square().mean())
        optimizer.zero_grad()  # Accelerate passes set_to_none=True where the signature has it
        assert all(p.grad is None for p in model.parameters())
    after = cached.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 2
    assert cached(optimizer.optimizer.zero_grad) == inspect.signature(optimizer.optimizer.zero_grad)
    # The rest of the module is the real inspect's.
    assert accelerate.optimizer.inspect.getsource is inspect.getsource


@pytest.mark.parametrize("accumulation", [1, 2])
def test_backward_gives_accelerates_gradients(accumulation):
    # The shortcut skips Accelerate's division of the loss by 1; with accumulation it must not skip it.
    apply()

    def gradients(accelerator_class):
        try:
            accelerator, model, _ = prepared(accumulation, accelerator_class)
            accelerator.backward(model(torch.randn(8, 4)).square().mean())
            return accelerator, [p.grad.clone() for p in model.parameters()]
        finally:
            AcceleratorState._reset_state(True)

    (ours, mine), (_, accelerates) = gradients(patches.Accelerator), gradients(accelerate.Accelerator)
    assert ours._plain_backward  # the shortcut was on; it is taken only when accumulation == 1
    assert all(torch.equal(a, b) for a, b in zip(mine, accelerates, strict=True))


def test_moved_lomo_check_disables_that_patch(monkeypatch):
    monkeypatch.delattr(accelerate.optimizer, "is_lomo_available")
    active, lines = apply()
    assert active == {"lomo": False, "signature": True, "backward": True}
    assert lines == [
        f"patches: lomo skipped: accelerate.optimizer.is_lomo_available is gone "
        f"(Accelerate {accelerate.__version__}; see pipeline/patches.py)"
    ]
    assert not hasattr(accelerate.optimizer, "is_lomo_available")


def test_lomo_check_no_longer_called_disables_that_patch(monkeypatch):
    monkeypatch.setattr(accelerate.optimizer.AcceleratedOptimizer, "step", lambda self, closure=None: None)
    active, lines = apply()
    assert not active["lomo"] and len(lines) == 1
    assert "lomo skipped: AcceleratedOptimizer.step no longer calls is_lomo_available" in lines[0]


def test_replaced_inspect_disables_the_signature_patch(monkeypatch):
    stand_in = SimpleNamespace(signature=inspect.signature)  # accelerate.optimizer imports something else now
    monkeypatch.setattr(accelerate.optimizer, "inspect", stand_in)
    active, lines = apply()
    assert active == {"lomo": True, "signature": False, "backward": True}
    assert len(lines) == 1
    assert "signature skipped: accelerate.optimizer no longer imports the inspect module" in lines[0]
    assert accelerate.optimizer.inspect is stand_in


def test_zero_grad_without_inspect_disables_the_signature_patch(monkeypatch):
    monkeypatch.setattr(
        accelerate.optimizer.AcceleratedOptimizer,
        "zero_grad",
        lambda self, set_to_none=None: self.optimizer.zero_grad(),
    )
    active, lines = apply()
    assert not active["signature"] and len(lines) == 1 and "zero_grad no longer calls inspect.signature" in lines[0]
    assert accelerate.optimizer.inspect is inspect


def test_changed_backward_falls_back_to_accelerates(monkeypatch):
    def backward(self, loss, **kwargs):  # an Accelerate whose backward decides on something else
        (loss / self.gradient_accumulation_steps).backward(**kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "backward", backward)
    active, lines = apply()
    assert active == {"lomo": True, "signature": True, "backward": False}
    assert (
        len(lines) == 1
        and "backward skipped: accelerate.Accelerator.backward no longer reads scaler, distributed_type" in lines[0]
    )
    accelerator, model, _ = prepared()
    assert not accelerator._plain_backward
    accelerator.backward(model(torch.randn(8, 4)).square().mean())
    assert all(p.grad is not None for p in model.parameters())


def test_accelerator_without_scaler_defers_to_accelerate(monkeypatch):
    init = accelerate.Accelerator.__init__

    def init_without_scaler(self, *args, **kwargs):  # an Accelerate that keeps the scaler elsewhere
        init(self, *args, **kwargs)
        del self.scaler

    monkeypatch.setattr(accelerate.Accelerator, "__init__", init_without_scaler)
    lines = []
    patches.apply(lines.append)
    assert not patches.Accelerator(cpu=True)._plain_backward
    assert len(lines) == 1 and "backward skipped: Accelerator has no scaler" in lines[0]


def test_apply_is_idempotent():
    original = accelerate.optimizer.is_lomo_available
    first, lines = apply()
    lomo, namespace = accelerate.optimizer.is_lomo_available, accelerate.optimizer.inspect
    second, more = apply()
    assert first == second == {"lomo": True, "signature": True, "backward": True} and lines == more == []
    # Not wrapped twice: the same cached function and namespace, around the originals.
    assert accelerate.optimizer.is_lomo_available is lomo and lomo.__wrapped__ is original
    assert accelerate.optimizer.inspect is namespace


def test_environment_turns_patches_off_and_back(monkeypatch):
    original = accelerate.optimizer.is_lomo_available
    apply()
    monkeypatch.setenv(patches.ENV, "lomo, backward")
    active, lines = apply()
    assert active == {"lomo": False, "signature": True, "backward": False}
    assert lines == [f"patches: lomo off ({patches.ENV})", f"patches: backward off ({patches.ENV})"]
    assert accelerate.optimizer.is_lomo_available is original  # removed, not left behind
    accelerator, _, _ = prepared()
    assert not accelerator._plain_backward
    monkeypatch.setenv(patches.ENV, "all")
    assert not any(apply()[0].values()) and accelerate.optimizer.inspect is inspect
    monkeypatch.delenv(patches.ENV)
    assert all(apply()[0].values())


def test_unknown_patch_name_in_environment_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv(patches.ENV, "lomo,sigature")
    with pytest.raises(ConfigError, match="unknown patch sigature; valid names: lomo, signature, backward, all"):
        patches.apply()


def test_importing_patches_changes_nothing():
    # Applied explicitly when a run starts, never as a side effect of an import.
    code = (
        "import inspect, accelerate.optimizer as o, pipeline.patches as p; "
        "assert o.inspect is inspect and not hasattr(o.is_lomo_available, 'cache_info'); "
        "assert not any(p.active.values()) and not p.Accelerator(cpu=True)._plain_backward"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment(), check=True, timeout=120)
