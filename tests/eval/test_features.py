"""Features for evaluation: labeled sets, extraction that leaves training untouched, shares of
several processes, and the feature cache (other weights or a changed folder are not served)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lowres_ssl.errors import UserError
from lowres_ssl.eval.features import (
    align_classes,
    cached_features,
    evenly_spaced,
    extract,
    open_labeled,
    split_spec,
)
from lowres_ssl.models import build_backbone
from lowres_ssl.weights import state_sha256


def labeled_folder(root, classes=("cat", "dog", "eel"), per_class=6, seed=0, bad=True):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    if bad:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return root


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18", image_size=16)


def test_dataset_specs_and_folders(tmp_path):
    assert split_spec("cifar10:test") == ("cifar10", "test")
    assert split_spec("CIFAR10", default_split="test") == ("cifar10", "test")
    assert split_spec(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(UserError, match="cifar10 has no split 'val'"):
        split_spec("cifar10:val")
    with pytest.raises(UserError, match="is not a folder; pass a labeled folder"):
        split_spec(str(tmp_path / "missing"))


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_extraction_counts_bad_files_and_leaves_training_untouched(tmp_path, backbone, cache):
    labeled = open_labeled(
        str(labeled_folder(tmp_path / "set")), size=16, cache=cache, cache_dir=tmp_path / "c"
    )
    assert labeled.classes == ["cat", "dog", "eel"]
    backbone.train()
    bn = backbone.bn1.running_mean.clone()
    rng = torch.get_rng_state()
    features, found, skips = extract(backbone, labeled, device=torch.device("cpu"), batch_size=4)
    assert backbone.training  # train mode restored
    assert torch.equal(backbone.bn1.running_mean, bn)  # eval mode: statistics untouched
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
    assert features.shape == (len(labeled), 512)
    assert [s.path for s in skips] == ["cat/broken.png"]
    assert int(found.sum()) == 18  # the broken file is not among the found rows
    assert (features[~found] == 0).all() and (features[found].abs().sum(1) > 0).all()
    # The features are those of the backbone in eval mode on the normalised images.
    one = features[found][0]
    assert torch.isfinite(one).all()


def test_shares_of_several_processes_sum_to_the_whole(tmp_path, backbone):
    labeled = open_labeled(str(labeled_folder(tmp_path / "set")), size=16, cache="none")
    device = torch.device("cpu")
    whole, found, _ = extract(backbone, labeled, device=device, batch_size=4)
    parts = [
        extract(backbone, labeled, device=device, batch_size=4, rank=r, world_size=3)
        for r in range(3)
    ]
    assert torch.equal(sum(p[1].int() for p in parts) > 0, found)
    assert max(int(p[1].int().sum()) for p in parts) <= 8  # each computed its share only
    assert torch.allclose(sum(p[0] for p in parts), whole, rtol=1e-5, atol=1e-6)


def test_evenly_spaced_subsets_keep_the_class_balance():
    assert evenly_spaced(10, None) is None and evenly_spaced(10, 20) is None
    labels = torch.arange(1000) // 100  # sorted by class, as an ImageFolder is
    rows = evenly_spaced(1000, 50)
    assert len(rows) == 50 and torch.bincount(labels[rows]).tolist() == [5] * 10


def test_test_classes_must_be_train_classes():
    labels = torch.tensor([0, 1, 1])
    assert align_classes(["a", "b", "c"], ["b", "c"], labels, "t").tolist() == [1, 2, 2]
    with pytest.raises(UserError, match=r"--test t has classes the train set lacks \(z\)") as e:
        align_classes(["a", "b"], ["a", "z"], labels, "t")
    assert "\n" not in str(e.value)


def test_the_feature_cache_serves_only_the_same_weights_and_files(tmp_path, backbone):
    folder = labeled_folder(tmp_path / "set", bad=False)
    cache = tmp_path / "cache"
    device = torch.device("cpu")

    def features(net, **kwargs):
        labeled = open_labeled(str(folder), size=16, cache="disk", cache_dir=cache)
        return cached_features(
            net,
            labeled,
            weights_sha256=state_sha256(net.state_dict()),
            precision="fp32",
            device=device,
            cache_dir=cache,
            batch_size=8,
            **kwargs,
        )

    first = features(backbone)
    again = features(backbone)
    assert not first.from_cache and again.from_cache
    assert torch.equal(first.features, again.features) and torch.equal(first.labels, again.labels)

    other = build_backbone("resnet18", image_size=16)
    with torch.no_grad():
        other.conv1.weight.mul_(2)
    assert not features(other).from_cache  # other weights

    labeled_folder(tmp_path / "set", classes=("dog",), per_class=1, seed=7, bad=False)
    os.utime(folder / "dog" / "0.png", ns=(1, 1))  # the same name, other pixels and time
    changed = features(backbone)
    assert not changed.from_cache  # a changed folder
    assert not torch.equal(changed.features, first.features)
    assert not features(backbone, use_cache=False).from_cache
