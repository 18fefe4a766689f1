"""The two events of the loop and the parts that hear them.

The loop calls ``hooks.after_step(state, done)`` after every step and ``hooks.after_epoch(state)``
at every epoch's end; each part (reporting, the non-finite guard, checkpointing, evaluating,
the time budget) implements the events it needs, in the order the parts were given. A part
keeps its own state; what parts share is the :class:`~lowres_ssl.engine.state.State` they are
handed.
"""

from __future__ import annotations

from collections.abc import Callable

from lowres_ssl.engine.state import Progress, State, StepDone


class Part:
    """A concern beside the loop; both events do nothing unless a part says otherwise."""

    def after_step(self, state: State, done: StepDone) -> None:
        pass

    def after_epoch(self, state: State) -> None:
        pass


class Hooks:
    """The parts, in the order they hear each event."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts

    def after_step(self, state: State, done: StepDone) -> None:
        for part in self.parts:
            part.after_step(state, done)

    def after_epoch(self, state: State) -> None:
        for part in self.parts:
            part.after_epoch(state)


class StepCallback(Part):
    """The caller's ``on_step(progress, values)`` after every step (values: loss and lr)."""

    def __init__(self, on_step: Callable[[Progress, dict[str, float]], None]) -> None:
        self.on_step = on_step

    def after_step(self, state: State, done: StepDone) -> None:
        self.on_step(state.progress, {"loss": done.result.loss, "lr": done.lr})


__all__ = ["Hooks", "Part", "StepCallback"]
