"""The training engine: the loop and the parts beside it (checkpointing, evaluating, the time
budget, reporting, stopping), for any task that implements :class:`~.task.Task`."""

from lowres_ssl.engine.state import Progress
from lowres_ssl.engine.trainer import train

__all__ = ["Progress", "train"]
