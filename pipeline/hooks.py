"""Debug hooks (`debug.hooks=true`): per-layer activation mean/std and gradient norms, every N steps.

A forward hook on every leaf layer; on steps that will be logged it records the output's statistics
and hooks the output tensor for its gradient (nothing is wrapped or recorded on other steps).
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

    def _forward(self, name: str):
        def hook(module, inputs, output):
            if self.active and torch.is_tensor(output):
                out = output.detach().float()
                self.values[f"debug/activation_mean/{name}"] = out.mean()
                self.values[f"debug/activation_std/{name}"] = out.std()
                if output.requires_grad:  # the gradient w.r.t. the layer's output, as it arrives
                    output.register_hook(self._gradient(name))

        return hook

    def _gradient(self, name: str):
        def hook(grad):
            self.values[f"debug/grad_norm/{name}"] = grad.detach().float().norm()

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
