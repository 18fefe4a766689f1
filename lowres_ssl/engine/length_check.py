"""The plan's rule for long runs on photos, checked against the steps the time budget fits.

The plan counted a time budget in images at the rule's stated rate (:mod:`lowres_ssl.length`)
and chose the loss once, before the run. Once the budget has measured the steps and fitted the
total, :class:`LengthCheck` counts the images again; where they fall on the other side of the
rule's threshold it says so in one line, with the rate that would plan this machine right. The
run keeps its plan (a loss is not changed mid-run, and a resumed run keeps it too).
"""

from __future__ import annotations

import logging

from lowres_ssl.engine.hooks import Part
from lowres_ssl.engine.state import State, StepDone
from lowres_ssl.length import Choice

log = logging.getLogger("lowres_ssl")


class LengthCheck(Part):
    """After the time budget's first fit (it comes before this part): one line where the
    fitted images and the plan's choice disagree."""

    def __init__(self, choice: Choice, images_per_step: int, *, main_process: bool) -> None:
        self.choice, self.images_per_step = choice, images_per_step
        self.main_process = main_process
        self.done = False

    def after_step(self, state: State, done: StepDone) -> None:
        if self.done or not state.total_known:
            return
        self.done = True
        line = self.choice.measured(state.total_steps * self.images_per_step)
        if line and self.main_process:
            log.warning(line)


__all__ = ["LengthCheck"]
