"""Optimizer, learning-rate schedule and weight initialisation chosen by name in the config.

Each registry below is the one list of names: the config's choices are built from its keys.
"""

from __future__ import annotations

import math

torch = nn = lr_scheduler = None  # imported on first use: the config reads these registries' names without torch


def _import_torch() -> None:
    global torch, nn, lr_scheduler
    import torch
    from torch import nn
    from torch.optim import lr_scheduler


OPTIMIZERS = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay),
    "adagrad": lambda p, c: torch.optim.Adagrad(p, lr=c.lr, weight_decay=c.weight_decay),
    "rmsprop": lambda p, c: torch.optim.RMSprop(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
}

# (optimizer, scheduler config, optimizer steps per epoch, steps after the warmup) -> schedule or None.
# `step_size` counts epochs, as in the tutorials; every schedule steps once per optimizer step.
SCHEDULERS = {
    "none": lambda opt, c, per_epoch, steps: None,
    "step": lambda opt, c, per_epoch, steps: lr_scheduler.StepLR(opt, step_size=c.step_size * per_epoch, gamma=c.gamma),
    "cosine": lambda opt, c, per_epoch, steps: lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps)),
    # Has its own warmup, so the config refuses scheduler.warmup_steps with it.
    "onecycle": lambda opt, c, per_epoch, steps: lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(1, steps)
    ),
}


# ELU's, GELU's and SiLU's positive halves are ReLU's, so they take ReLU's gain.
RELU_LIKE = ("relu", "elu", "gelu", "silu")


def _gain(nonlinearity: str) -> float:
    return nn.init.calculate_gain("relu" if nonlinearity in RELU_LIKE else nonlinearity)


def _kaiming(nonlinearity: str) -> str:
    return "relu" if nonlinearity in RELU_LIKE else ("leaky_relu" if nonlinearity == "leaky_relu" else "linear")


# (weight, the model's nonlinearity) -> initialised in place; None keeps PyTorch's own init.
INITS = {
    "default": None,
    "xavier_uniform": lambda w, nl: nn.init.xavier_uniform_(w, gain=_gain(nl)),
    "xavier_normal": lambda w, nl: nn.init.xavier_normal_(w, gain=_gain(nl)),
    "kaiming_uniform": lambda w, nl: nn.init.kaiming_uniform_(w, nonlinearity=_kaiming(nl)),
    "kaiming_normal": lambda w, nl: nn.init.kaiming_normal_(w, nonlinearity=_kaiming(nl)),
}


def key_of(choice) -> str:
    """The registry key of a config choice: the config holds Enum members named by the keys."""
    return getattr(choice, "name", choice)


def optimizer(cfg, params) -> torch.optim.Optimizer:
    _import_torch()
    return OPTIMIZERS[key_of(cfg.name)](params, cfg)


def scheduler(cfg, opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    """A per-optimizer-step schedule after an optional linear warmup; None for `none` without warmup."""
    _import_torch()
    total = steps_per_epoch * epochs
    warmup = min(cfg.warmup_steps, total)
    main = SCHEDULERS[key_of(cfg.name)](opt, cfg, steps_per_epoch, total - warmup)
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(opt, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    if main is None:
        return ramp
    return lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup])


def init_weights(model: nn.Module, name, nonlinearity: str = "relu") -> None:
    """Re-initialises every Linear and Conv layer; biases to zero. `default` keeps PyTorch's init."""
    _import_torch()
    init = INITS[key_of(name)]
    if init is None:
        return
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            init(m.weight, nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def steps(n_batches: int, accum: int) -> int:
    return math.ceil(n_batches / accum)
