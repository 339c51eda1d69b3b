"""Optimizer, learning-rate schedule and weight initialisation chosen by name in the config."""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay),
    "adagrad": lambda p, c: torch.optim.Adagrad(p, lr=c.lr, weight_decay=c.weight_decay),
    "rmsprop": lambda p, c: torch.optim.RMSprop(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
}


def optimizer(cfg, params) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](params, cfg)


def scheduler(cfg, opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    """A per-optimizer-step schedule; `step_size` counts epochs as in the tutorials. None for `none`."""
    total = steps_per_epoch * epochs
    warmup = min(cfg.warmup_steps, total)
    if cfg.name == "none":
        main = None
    elif cfg.name == "step":
        main = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    elif cfg.name == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup))
    elif cfg.name == "onecycle":
        if warmup:
            raise ValueError("scheduler.onecycle has its own warmup; leave scheduler.warmup_steps=0")
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=max(1, total))
    else:
        raise ValueError(f"unknown scheduler {cfg.name!r}")
    if not warmup:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    if main is None:
        return ramp
    return torch.optim.lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup])


def init_weights(model: nn.Module, name: str, nonlinearity: str = "relu") -> None:
    """Re-initialises every Linear and Conv layer; biases to zero. `default` keeps PyTorch's init."""
    if name == "default":
        return
    # ELU's positive half is ReLU's, so it takes ReLU's gain.
    gain = nn.init.calculate_gain("relu" if nonlinearity == "elu" else nonlinearity)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if name == "xavier_uniform":
                nn.init.xavier_uniform_(m.weight, gain=gain)
            elif name == "xavier_normal":
                nn.init.xavier_normal_(m.weight, gain=gain)
            elif name == "kaiming_uniform":
                nn.init.kaiming_uniform_(m.weight, nonlinearity=_kaiming(nonlinearity))
            elif name == "kaiming_normal":
                nn.init.kaiming_normal_(m.weight, nonlinearity=_kaiming(nonlinearity))
            else:
                raise ValueError(f"unknown init {name!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _kaiming(nonlinearity: str) -> str:
    return "relu" if nonlinearity in ("relu", "elu") else ("leaky_relu" if nonlinearity == "leaky_relu" else "linear")


def steps(n_batches: int, accum: int) -> int:
    return math.ceil(n_batches / accum)
