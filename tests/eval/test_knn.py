"""Weighted kNN: against an independent float64 brute-force reference written here (numpy
argsort per test row, votes added one neighbour at a time), a hand-made case whose answer
depends on the temperature, and the input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowres_ssl.errors import UserError
from lowres_ssl.eval.knn import knn_evaluate, knn_scores, topk_correct

# ------------------------------------------------------------------ reference


def reference_scores(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int, t: float, c: int
) -> np.ndarray:
    """score[i, c] = Σ exp(s / t) over the k most similar train rows of class c (float64)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), c))
    for i, row in enumerate(test):
        similarity = train @ row
        for j in np.argsort(-similarity)[:k]:
            scores[i, train_labels[j]] += math.exp(similarity[j] / t)
    return scores


def ranking(scores: np.ndarray) -> np.ndarray:
    """Classes by decreasing score, ties (exact zeros: classes without votes) by index."""
    return np.argsort(-scores, axis=1, kind="stable")


def random_problem(seed: int, n_train: int = 300, n_test: int = 100, dim: int = 32, c: int = 7):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n_train, dim)),
        rng.integers(0, c, n_train),
        rng.standard_normal((n_test, dim)),
        rng.integers(0, c, n_test),
    )


# ------------------------------------------------------------------ against the reference


def test_scores_match_reference_in_float64_over_several_chunks():
    train, train_labels, test, _ = random_problem(0)
    ks = (1, 5, 20, 200, 500)  # 500 > n_train = 300: every train row votes
    temperature = 0.1
    # 16 test rows per chunk of 300 float64 similarities: 7 chunks, the last one partial.
    scores = knn_scores(
        torch.from_numpy(train),
        torch.from_numpy(train_labels),
        torch.from_numpy(test),
        ks=ks,
        temperature=temperature,
        num_classes=7,
        max_chunk_bytes=16 * 300 * 8,
    )
    assert set(scores) == set(ks)
    for k in ks:
        got = scores[k]
        assert got.dtype == torch.float64 and got.shape == (100, 7)
        want = reference_scores(train, train_labels, test, k, temperature, 7)
        # float64 sums of ≤ 300 positive terms: ~1e-14 relative; 1e-10 leaves room.
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=0)
        assert np.array_equal(got.numpy().argmax(axis=1), want.argmax(axis=1))
        got_top5, want_top5 = ranking(got.numpy())[:, :5], ranking(want)[:, :5]
        assert all(set(a) == set(b) for a, b in zip(got_top5, want_top5, strict=True))


def test_chunking_does_not_change_the_scores():
    train, train_labels, test, _ = random_problem(1)
    args = (torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test))
    one_chunk = knn_scores(*args, ks=(20,))[20]
    one_row_per_chunk = knn_scores(*args, ks=(20,), max_chunk_bytes=1)[20]
    # A one-row product may take another BLAS kernel (another summation order): ~1e-16.
    torch.testing.assert_close(one_row_per_chunk, one_chunk, rtol=1e-12, atol=0)


def test_accuracy_matches_reference():
    train, train_labels, test, test_labels = random_problem(2, c=12)
    # Cluster structure so that accuracies are far from both 0 and 1.
    centres = np.random.default_rng(3).standard_normal((12, 32))
    train, test = train + 0.4 * centres[train_labels], test + 0.4 * centres[test_labels]
    results = knn_evaluate(
        *(torch.from_numpy(a) for a in (train, train_labels, test, test_labels)),
        ks=(20, 200),
        max_chunk_bytes=4096,
    )
    for k, result in results.items():
        want = reference_scores(train, train_labels, test, k, 0.07, 12)
        # Ties (classes without votes all score 0) count against the label.
        label_score = want[np.arange(100), test_labels]
        rank = sum(want[:, c] >= label_score for c in range(12)) - 1
        want_top1, want_top5 = np.mean(rank < 1), np.mean(rank < 5)
        assert (result.top1, result.top5) == pytest.approx((want_top1, want_top5), abs=1e-12)
        assert 0.2 < result.top1 < result.top5 < 1
        assert (result.k, result.n_train, result.n_test) == (k, 300, 100)


def test_float32_features_score_in_float32_close_to_float64():
    train, train_labels, test, _ = random_problem(4)
    labels = torch.from_numpy(train_labels)
    s64 = knn_scores(torch.from_numpy(train), labels, torch.from_numpy(test), ks=(20,))[20]
    s32 = knn_scores(
        torch.from_numpy(train).float(), labels, torch.from_numpy(test).float(), ks=(20,)
    )[20]
    assert s32.dtype == torch.float32
    # exp(s/T) turns a similarity error of ~1e-7 into ~1e-7/T = 1.5e-6 relative.
    torch.testing.assert_close(s32.double(), s64, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ known answers


def test_temperature_decides_between_one_close_and_three_farther_neighbours():
    # On the unit circle: class 0 at angle 0, class 1 at angles ±0.5 and 0.55; query at 0.
    angles = torch.tensor([0.0, 0.5, -0.5, 0.55], dtype=torch.float64)
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[3.0, 0.0]], dtype=torch.float64)  # norm 3: normalised inside
    for temperature, winner in ((0.07, 0), (1.0, 1)):
        scores = knn_scores(train, labels, query, ks=(1, 4), temperature=temperature)
        assert scores[1][0].tolist() == pytest.approx([math.exp(1 / temperature), 0.0])
        far = sum(math.exp(math.cos(a) / temperature) for a in (0.5, -0.5, 0.55))
        assert scores[4][0].tolist() == pytest.approx([math.exp(1 / temperature), far])
        assert int(scores[4][0].argmax()) == winner


def test_two_clusters_on_a_circle_are_classified_by_their_side():
    g = torch.Generator().manual_seed(0)
    angles = torch.cat([torch.rand(50, generator=g) - 0.5, math.pi + torch.rand(50, generator=g)])
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0] * 50 + [1] * 50)
    test_angles = torch.tensor([0.3, -1.2, math.pi - 0.7, math.pi + 1.3])
    test = torch.stack([test_angles.cos(), test_angles.sin()], dim=1)
    results = knn_evaluate(train, labels, test, torch.tensor([0, 0, 1, 1]), ks=(1, 20, 100))
    assert {k: r.top1 for k, r in results.items()} == {1: 1.0, 20: 1.0, 100: 1.0}


def test_top5_at_least_top1_and_one_with_at_most_five_classes():
    for c in (3, 5, 9):
        train, train_labels, test, test_labels = random_problem(5, c=c)
        results = knn_evaluate(
            *(torch.from_numpy(a) for a in (train, train_labels, test, test_labels)), ks=(1, 20)
        )
        for result in results.values():
            assert result.top5 >= result.top1
            assert (result.top5 == 1.0) == (c <= 5)


def test_topk_correct_counts_ties_against_the_label():
    scores = torch.tensor([[3.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0], [0.0, 5.0, 1.0, 2.0]])
    labels = torch.tensor([1, 2, 0])
    # Row 0: label tied with two others at 0 → rank 3; row 1: tied with class 1 → rank 1;
    # row 2: three classes above → rank 3. k = 9 is capped at 4 classes.
    assert topk_correct(scores, labels, ks=(1, 2, 3, 4, 9)) == {1: 0, 2: 1, 3: 1, 4: 3, 9: 3}


def test_global_rng_untouched():
    train, train_labels, test, test_labels = random_problem(6)
    state = torch.get_rng_state()
    knn_evaluate(*(torch.from_numpy(a) for a in (train, train_labels, test, test_labels)))
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"test_features": torch.randn(4, 5)}, "dims"),
        ({"train_labels": torch.zeros(9, dtype=torch.long)}, "entries for 10 rows"),
        ({"test_labels": torch.zeros(3, dtype=torch.long)}, "entries for 4 rows"),
        ({"train_features": torch.randn(10)}, "2-D"),
        ({"train_labels": torch.zeros(10)}, "integer"),
        ({"train_features": torch.randn(0, 6), "train_labels": torch.zeros(0, dtype=int)}, "empty"),
        ({"train_labels": torch.full((10,), -1)}, "≥ 0"),
        ({"ks": (0,)}, "positive integers"),
        ({"temperature": 0.0}, "positive"),
        ({"temperature": 1e-3}, "overflows"),
        ({"num_classes": 2}, "out of range"),
        ({"train_features": torch.full((10, 6), math.nan)}, "NaN"),
    ],
)
def test_bad_input_is_a_user_error(change, message):
    args = {
        "train_features": torch.randn(10, 6),
        "train_labels": torch.arange(10) % 3,
        "test_features": torch.randn(4, 6),
        "test_labels": torch.arange(4) % 3,
    }
    args.update(change)
    with pytest.raises(UserError, match=message):
        knn_evaluate(**args)


def test_leave_one_out_is_each_row_classified_by_the_others_alone():
    gen = np.random.default_rng(3)
    feats, labels = gen.normal(size=(40, 6)), gen.integers(0, 4, size=40)
    x = torch.from_numpy(feats)
    got = knn_scores(x, torch.from_numpy(labels), x, ks=(5, 100), leave_one_out=True, num_classes=4)
    for i in range(40):
        others = np.delete(np.arange(40), i)
        for k in (5, 100):  # k = 100 is capped at the 39 others
            want = reference_scores(feats[others], labels[others], feats[i : i + 1], k, 0.07, 4)
            np.testing.assert_allclose(got[k][i].numpy(), want[0], rtol=1e-12)
    result = knn_evaluate(x, torch.from_numpy(labels), x, torch.from_numpy(labels), ks=(100,),
                          leave_one_out=True)  # fmt: skip
    assert result[100].k == 39
    with pytest.raises(UserError, match="pass them as the test rows"):
        knn_scores(x, torch.from_numpy(labels), x.clone(), leave_one_out=True)
