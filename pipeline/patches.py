"""Speed patches to Accelerate's internals: one place, applied explicitly when a run starts, each guarded.
A patch whose target moved or changed shape in the installed Accelerate is skipped with one log line.

`apply()` installs them (idempotent); `Accelerator` is Accelerate's with the `backward` shortcut, active
once `apply()` allowed it. Turn patches off by name, e.g. to measure them or to rule them out when
something looks wrong:  PIPELINE_NO_PATCHES=lomo,signature,backward  (or  PIPELINE_NO_PATCHES=all).
Tested against the Accelerate range pinned in pyproject.toml; tests/test_patches.py must pass before
widening it.
"""

from __future__ import annotations

import functools
import inspect
import os
from types import SimpleNamespace

import accelerate
import accelerate.optimizer
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from pipeline.errors import ConfigError

ENV = "PIPELINE_NO_PATCHES"

# What apply() decided last; the Accelerator below reads "backward". Off until apply() runs: nothing
# is patched by importing this module.
active = {"lomo": False, "signature": False, "backward": False}
_log = print

PLAIN_BACKWARD = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def apply(log=print) -> dict[str, bool]:
    """Installs every patch that its guard allows and PIPELINE_NO_PATCHES does not turn off (a turned-off
    patch installed by an earlier call is removed); returns which are active. Safe to call again."""
    global _log
    _log = log
    off = turned_off()
    for name, patch in (("lomo", _lomo), ("signature", _signature), ("backward", _backward)):
        why = patch(on=name not in off)  # a reason when the target moved, else None
        if why:
            log(f"patches: {name} skipped: {why} (Accelerate {accelerate.__version__}; see pipeline/patches.py)")
        elif name in off:
            log(f"patches: {name} off ({ENV})")
        active[name] = not why and name not in off
    return dict(active)


def turned_off() -> set[str]:
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    if "all" in names:
        return set(active)
    if unknown := names - set(active):
        raise ConfigError(
            f"{ENV}={os.environ[ENV]!r}: unknown patch {', '.join(sorted(unknown))}; "
            f"valid names: {', '.join(active)}, all"
        )
    return names


def _calls(function, name: str) -> bool:
    """Whether `function`'s own code still refers to `name` (else patching `name` would change nothing)."""
    return name in getattr(getattr(function, "__code__", None), "co_names", ())


# ---- lomo
# Accelerate's optimizer step asks the file system twice per step whether the optional `lomo_optim`
# package is installed (importlib find_spec): ~100 us a step, a third of a small model's step on a
# CPU. The answer cannot change during a run, so it is asked once.
# Measured gain (Accelerate 1.15.0, torch 2.14 CPU, 1 thread, mnist_mlp's model and batch 64, real prepared
# steps, on/off interleaved, 3 runs): 14-16% of the step (95-125 of ~650-800 us CPU time).
_cached_lomo = None


def _lomo(on: bool) -> str | None:
    global _cached_lomo
    current = getattr(accelerate.optimizer, "is_lomo_available", None)
    original = current.__wrapped__ if current is not None and current is _cached_lomo else current
    if not callable(original):
        return "accelerate.optimizer.is_lomo_available is gone"
    if not _calls(AcceleratedOptimizer.step, "is_lomo_available"):
        return "AcceleratedOptimizer.step no longer calls is_lomo_available"
    if on and current is not _cached_lomo:
        _cached_lomo = functools.cache(original)
    accelerate.optimizer.is_lomo_available = _cached_lomo if on else original
    return None


# ---- signature
# Accelerate's zero_grad reads the wrapped optimizer's signature on every call (inspect.signature
# unwraps torch's decorators: 7-25 us a step); the signature of a given optimizer's method is fixed.
# Only accelerate.optimizer's name `inspect` is swapped, for a copy of the module whose `signature`
# is cached (keyed by the bound method: it keeps up to 16 optimizers alive).
# Measured gain (as for lomo above): 3-10% of the step (22-70 us).
_cached_inspect = SimpleNamespace(**{**vars(inspect), "signature": functools.lru_cache(maxsize=16)(inspect.signature)})


def _signature(on: bool) -> str | None:
    current = getattr(accelerate.optimizer, "inspect", None)
    if current is not inspect and current is not _cached_inspect:
        return "accelerate.optimizer no longer imports the inspect module"
    if not _calls(AcceleratedOptimizer.zero_grad, "inspect"):
        return "AcceleratedOptimizer.zero_grad no longer calls inspect.signature"
    accelerate.optimizer.inspect = _cached_inspect if on else inspect
    return None


# ---- backward
# Accelerate divides the loss by the accumulation steps before every backward, by 1 too: one more op
# and autograd node a step (3-4% of mnist_mlp's ~350-us CPU step). Without accumulation, loss scaling
# (fp16) or an engine of its own (DeepSpeed, Megatron, LOMO), its backward is exactly loss.backward().
# Measured gain (as for lomo above): 2-7% of the step (15-49 us). All three together: 19-23% (154-189 us).
READS = ("gradient_accumulation_steps", "scaler", "distributed_type")


def _backward(on: bool) -> str | None:
    # The shortcut stands in for Accelerate's backward only while that still decides on these attributes.
    unread = [name for name in READS if not _calls(accelerate.Accelerator.backward, name)]
    if unread:
        return f"accelerate.Accelerator.backward no longer reads {', '.join(unread)}"
    return None


class Accelerator(accelerate.Accelerator):
    """Accelerate's, minus one op a step on the plain path of `backward` (once `apply()` allowed it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Checked once per accelerator, not per step: an instance without them defers to Accelerate.
        missing = [name for name in READS if not hasattr(self, name)]
        if active["backward"] and missing:
            _log(
                f"patches: backward skipped: Accelerator has no {', '.join(missing)} "
                f"(Accelerate {accelerate.__version__}; see pipeline/patches.py)"
            )
        self._plain_backward = active["backward"] and not missing

    def backward(self, loss, **kwargs):
        if (
            self._plain_backward
            and self.gradient_accumulation_steps == 1
            and self.scaler is None
            and not kwargs
            and self.distributed_type in PLAIN_BACKWARD
        ):
            loss.backward()
        else:
            super().backward(loss, **kwargs)
