"""The training engine: the loop, checkpoints and metrics."""

from lowres_ssl.engine.checkpoint import Progress
from lowres_ssl.engine.trainer import BACKBONE_FILE, resolve_precision, train
from lowres_ssl.weights import load_init

__all__ = ["BACKBONE_FILE", "Progress", "load_init", "resolve_precision", "train"]
