"""Random streams: the data's draws, alike on every process, and the model's own (dropout), one per process.

Both are functions of the seed and where the run stands, so a resumed run draws what the uninterrupted one
drew, on the same or another process count.
"""

from __future__ import annotations

import numpy as np
import torch


def derive(*numbers: int) -> int:
    """A 63-bit seed from several whole numbers: SeedSequence's mixing, so nearby tuples give unrelated seeds."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def seed_model(seed: int, process: int, step: int) -> None:
    """Seeds torch's global CPU and CUDA streams for this process at optimizer step `step`.

    The model's own randomness (nn.Dropout, StochasticDepth) draws from them inside each process, so each
    process must have its own stream, or every slice of the global batch gets the same masks. The data side
    never draws from them (see `Draws`, the loaders' generators), so this changes nothing but the model's
    draws. The loop calls it when training starts or resumes and before every checkpoint is saved: the
    checkpoint's `random_states_<i>.pkl` then holds this state, and any resume from it continues as the
    uninterrupted run does.
    """
    torch.manual_seed(derive(seed, process, step))  # every CUDA device's default generator too


class Draws:
    """The data side's random numbers (augmentation), drawn for the whole global batch alike on every process,
    from a generator that depends on (seed, epoch, micro-batch into the epoch) alone. The loop says which
    micro-batch comes (`at`); a recipe asks for the generator of its batch's device, seeded afresh for it."""

    def __init__(self):
        self.key = (0, 0, 0)
        self.generators = {}  # device -> generator
        self.seeded = set()  # the devices whose generator was seeded for this micro-batch

    def at(self, seed: int, epoch: int, batch: int) -> None:
        self.key = (seed, epoch, batch)
        self.seeded.clear()

    def generator(self, device) -> torch.Generator:
        device = torch.device(device)
        if device not in self.generators:
            self.generators[device] = torch.Generator(device)
        if device not in self.seeded:
            self.generators[device].manual_seed(derive(*self.key))
            self.seeded.add(device)
        return self.generators[device]


DRAWS = Draws()
