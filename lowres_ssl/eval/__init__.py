"""Evaluation of frozen representations: features, kNN, linear probe, the online kNN monitor.

>>> from lowres_ssl.eval import evaluate
>>> evaluate("knn", checkpoint="runs/first", train="cifar10", test="cifar10:test")["knn_top1"]
"""

from lowres_ssl.eval.evaluate import evaluate, evaluation_line
from lowres_ssl.eval.features import (
    Features,
    LabeledSet,
    align_classes,
    cached_features,
    extract,
    open_labeled,
)
from lowres_ssl.eval.knn import KNNResult, knn_evaluate, knn_scores, topk_correct
from lowres_ssl.eval.linear import LinearProbeResult, linear_probe
from lowres_ssl.eval.monitor import KNNMonitor, eval_sets

__all__ = [
    "Features",
    "KNNMonitor",
    "KNNResult",
    "LabeledSet",
    "LinearProbeResult",
    "align_classes",
    "cached_features",
    "eval_sets",
    "evaluate",
    "evaluation_line",
    "extract",
    "knn_evaluate",
    "knn_scores",
    "linear_probe",
    "open_labeled",
    "topk_correct",
]
