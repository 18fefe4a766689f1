"""Small stand-ins for the engine's part tests: a clock that moves when told, an accelerator
of one process, step results."""

from __future__ import annotations

import torch

from lowres_ssl.engine.state import Progress, State, StepDone
from lowres_ssl.engine.steps import StepResult


class ManualClock:
    """Seconds that pass only when ``advance`` says."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class OneProcess:
    """What the parts ask of an Accelerator, for one process on the CPU."""

    is_main_process = True
    num_processes = 1
    process_index = 0
    device = torch.device("cpu")

    def unwrap_model(self, model):
        return model


def state(total: int = 100, clock=None) -> State:
    return State(Progress(), total, clock or ManualClock())


def done(loss: float = 1.0, *, finite: bool = True, images: int = 8, lr: float = 0.1) -> StepDone:
    terms = {"mmd": torch.tensor(loss / 2)}
    return StepDone(StepResult(loss, terms, finite), lr, images, views=None)
