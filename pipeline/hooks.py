"""Debug hooks (`debug.hooks=true`): per-layer activation mean/std and gradient norms, every N steps.

Forward and full backward hooks on every leaf layer; they record only on steps that will be logged.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerStats:
    def __init__(self, model: nn.Module):
        self.active = False
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name and not list(module.children()) and any(True for _ in module.parameters()):
                self.handles.append(module.register_forward_hook(self._forward(name)))
                self.handles.append(module.register_full_backward_hook(self._backward(name)))

    def _forward(self, name: str):
        def hook(module, inputs, output):
            if self.active and torch.is_tensor(output):
                out = output.detach().float()
                self.values[f"debug/activation_mean/{name}"] = out.mean()
                self.values[f"debug/activation_std/{name}"] = out.std()
        return hook

    def _backward(self, name: str):
        def hook(module, grad_input, grad_output):
            if self.active and grad_output and grad_output[0] is not None:
                self.values[f"debug/grad_norm/{name}"] = grad_output[0].detach().float().norm()
        return hook

    def collect(self) -> dict[str, float]:
        """The recorded values of the last active step as floats; stops recording."""
        out = {k: v.item() for k, v in self.values.items()}
        self.values.clear()
        self.active = False
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
