"""Evaluation on a CUDA device (skipped without one): features, kNN and the linear probe agree
with the CPU, and bf16 features classify like fp32 ones."""

from __future__ import annotations

import pytest
import torch

from lowres_ssl.eval import evaluate, knn_evaluate, linear_probe
from tests.eval.test_features import labeled_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_knn_and_linear_probe_on_cuda_match_the_cpu():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 64, generator=g) * 3
    labels = torch.arange(2000) % 5
    features = centres[labels] + torch.randn(2000, 64, generator=g)
    train, test = features[:1500], features[1500:]
    cpu = knn_evaluate(train, labels[:1500], test, labels[1500:])
    gpu = knn_evaluate(train.cuda(), labels[:1500].cuda(), test.cuda(), labels[1500:].cuda())
    assert all(cpu[k].top1 == gpu[k].top1 for k in cpu)  # exact fp32 (TF32 off): same votes
    a = linear_probe(train, labels[:1500], test, labels[1500:])
    b = linear_probe(train, labels[:1500], test, labels[1500:], device="cuda")
    assert abs(a.top1 - b.top1) <= 0.01


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluate_on_cuda_matches_the_cpu(tmp_path, precision):
    train_dir = labeled_folder(tmp_path / "train", per_class=20, seed=1, bad=False)
    test_dir = labeled_folder(tmp_path / "test", per_class=10, seed=2, bad=False)
    common = {
        "random_init": True,
        "backbone": "resnet18",
        "size": 16,
        "train": str(train_dir),
        "test": str(test_dir),
        "cache_dir": tmp_path / "c",
        "progress": False,
        "k": 10,
    }
    cpu = evaluate("knn", device="cpu", precision="fp32", **common)
    gpu = evaluate("knn", device="cuda", precision=precision, **common)
    assert gpu["device"].startswith("cuda") and gpu["precision"] == precision
    # 30 test images of random pixels: near-ties may flip a vote or two (cuDNN convolutions run
    # in TF32 by default even in fp32; bf16 more so), a broken device path flips many more.
    flips = abs(cpu["knn_top1"] - gpu["knn_top1"]) * gpu["n_test"]
    assert flips <= (2 if precision == "fp32" else 3) + 1e-9
