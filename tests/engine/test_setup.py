"""Setup: --autofit takes its probe batch from the task (fine-tuning's has labels)."""

import functools

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from lowres_ssl.config import from_dict
from lowres_ssl.engine.setup import autofit_micro_batch
from lowres_ssl.engine.steps import LabeledViews, supervised_step
from lowres_ssl.models import Classifier, build_backbone
from lowres_ssl.tasks import FineTuning


class FineTuningOnASmallCard(FineTuning):
    """Fine-tuning whose steps run out of CUDA memory above a micro-batch of 4."""

    def __init__(self):
        super().__init__()
        self.classes = ["a", "b", "c"]
        self.seen = []

    def step_for(self, cfg, micro):
        def step(model, objective, views, **kwargs):
            self.seen.append((micro, views))
            if micro is not None and micro > 4:
                raise torch.cuda.OutOfMemoryError("injected")
            return functools.partial(supervised_step, micro_batch_size=micro)(
                model, objective, views, **kwargs
            )

        return step


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_autofit_drives_fine_tuning_through_the_supervised_step_with_labels(accelerator):
    cfg = from_dict({
        "data": {"path": "unused", "load_size": 16, "recipe": "supervised"},
        "model": {"backbone": "resnet18"},
        "optim": {"name": "sgd", "weight_decay": 0.0},
        "train": {"batch_size": 12, "micro_batch_size": 12, "precision": "fp32"},
    })  # fmt: skip
    task = FineTuningOnASmallCard()
    torch.manual_seed(0)
    model = Classifier(build_backbone("resnet18", image_size=16), 3)
    optimizer, _ = task.optimizer(cfg, model, 12)
    model, optimizer = accelerator.prepare(model, optimizer)
    augment = task.augment(cfg)
    objective = task.objective(cfg)
    fitted = autofit_micro_batch(cfg, accelerator, task, model, optimizer, objective, augment)
    assert fitted.train.micro_batch_size == 4
    assert [m for m, _ in task.seen] == [12, 8, 4, 4]  # two real probe steps at the size that fits
    for _, views in task.seen:
        assert isinstance(views, LabeledViews) and len(views) == 12
        assert views.labels.min() >= 0 and views.labels.max() < 3
