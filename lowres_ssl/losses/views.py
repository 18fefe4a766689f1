"""Which views an objective compares and which it regularises: two views or multi-crop.

A batch has K views of the same n images, embeddings z⁰ … z^(K−1), each n × q. The **anchors**
A ⊆ {0 … K−1} are the views the others are compared with (SwAV's "general" views, the SFRIK
code's ``general_indices``). With d(a, v) a pairwise term (SFRIK's invariance, VICReg's MSE,
SimCLR's positive pairs) and R(v) a per-view term (the MMD, VICReg's variance and covariance),
every objective of the library uses

    invariance = (1/|A|)·Σ_{a∈A} (1/(K−1))·Σ_{v≠a} d(a, v)
    regulariser = (1/|R|)·Σ_{v∈R} R(v),   R = A, or every view with ``reg_small``

Two layouts of the official SFRIK code (valeoai/sfrik, ``ssl.py``) are this formula:

- **SwAV** (``nmb_crops``): L large crops and S small ones, the large crops are the anchors,
  A = {0 … L−1}. Two views are L = 2, S = 0: invariance d(0, 1), regulariser (R(0) + R(1))/2,
  the two-view objective exactly.
- **OBoW**: view 0 is the whole image, unaugmented but for a flip (OBoW's "original"), the only
  anchor, A = {0}; then L large crops and S small ones. Invariance: the mean over the crops of
  d(0, v); regulariser R(0), or the mean over all views with ``reg_small``.

d is symmetric, so each unordered pair is computed once, with the weight the formula gives it:
(#{a, b} ∩ A) / (|A|·(K − 1)); at two views the one pair has weight 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

LAYOUTS = ("swav", "obow")


@dataclass(frozen=True)
class ViewLayout:
    """K views, the anchors among them, and whether the regulariser sees every view.

    ``ViewLayout()`` is two views, both anchors (the two-view objective). Build multi-crop
    layouts with :meth:`swav` or :meth:`obow` (or :meth:`of` by name).
    """

    count: int = 2
    anchors: tuple[int, ...] = (0, 1)
    reg_small: bool = False

    def __post_init__(self) -> None:
        if type(self.count) is not int or self.count < 2:
            raise ValueError(f"a view layout needs at least 2 views, got {self.count!r}")
        anchors = tuple(self.anchors)
        if not anchors or len(set(anchors)) != len(anchors):
            raise ValueError(f"anchors must be distinct view indices, got {anchors}")
        if any(type(a) is not int or not 0 <= a < self.count for a in anchors):
            raise ValueError(f"anchors must be view indices in [0, {self.count}), got {anchors}")
        object.__setattr__(self, "anchors", tuple(sorted(anchors)))

    @classmethod
    def swav(cls, large: int = 2, small: int = 0, *, reg_small: bool = False) -> ViewLayout:
        """``large`` crops (the anchors, views 0 … large−1), then ``small`` crops."""
        return cls(large + small, tuple(range(large)), reg_small)

    @classmethod
    def obow(cls, large: int = 1, small: int = 0, *, reg_small: bool = False) -> ViewLayout:
        """The unaugmented whole image (view 0, the anchor), ``large`` crops, ``small`` crops."""
        return cls(1 + large + small, (0,), reg_small)

    @classmethod
    def of(cls, layout: str, large: int, small: int, *, reg_small: bool = False) -> ViewLayout:
        """The layout called ``layout`` (one of :data:`LAYOUTS`)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown view layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        build = cls.swav if layout == "swav" else cls.obow
        return build(large, small, reg_small=reg_small)

    @property
    def regularised(self) -> tuple[int, ...]:
        """The views the regulariser sees: the anchors, or all with ``reg_small``."""
        return tuple(range(self.count)) if self.reg_small else self.anchors

    def pairs(self) -> list[tuple[int, int, float]]:
        """The unordered pairs (a, b), a < b, that the invariance compares, with their weights
        (the module docstring); the weights sum to 1."""
        anchors, k = set(self.anchors), self.count
        scale = len(anchors) * (k - 1)
        out = []
        for a in range(k):
            for b in range(a + 1, k):
                hits = (a in anchors) + (b in anchors)
                if hits:
                    out.append((a, b, hits / scale))
        return out

    def positives(self) -> list[tuple[int, int]]:
        """(anchor row view v, positive view c) for a contrastive loss: every view v has its
        positives at each anchor c ≠ v, in the order v = 0, 1, …; at two views (0, 1), (1, 0)."""
        return [(v, c) for v in range(self.count) for c in self.anchors if c != v]

    def check(self, views: Sequence[Tensor], name: str) -> None:
        """``views`` must be this layout's K views (a one-line ValueError otherwise)."""
        if len(views) != self.count:
            raise ValueError(
                f"{name} expects {self.count} views (its layout: {self.describe()}), "
                f"got {len(views)}"
            )

    def describe(self) -> str:
        anchors = ", ".join(map(str, self.anchors))
        reg = "every view" if self.reg_small else "the anchors"
        return f"{self.count} views, anchors {anchors}, regulariser on {reg}"


def weighted_sum(terms: Sequence[tuple[Tensor, float]]) -> Tensor:
    """Σ w·t, with t itself where w = 1 (so one pair of weight 1 is the term, bit for bit)."""
    total = None
    for t, w in terms:
        t = t if w == 1 else t * w
        total = t if total is None else total + t
    if total is None:
        raise ValueError("no terms to sum")
    return total


def over_pairs(layout: ViewLayout, term: Callable[[int, int], Tensor]) -> Tensor:
    """The invariance: Σ over :meth:`ViewLayout.pairs` of weight · ``term(a, b)``."""
    return weighted_sum([(term(a, b), w) for a, b, w in layout.pairs()])


def mean_over(views: Sequence[int], term: Callable[[int], Tensor]) -> Tensor:
    """(1/|views|)·Σ term(v): the per-view mean, summed in order then divided (at two views,
    ``(t0 + t1) / 2``)."""
    return weighted_sum([(term(v), 1) for v in views]) / len(views)


__all__ = ["LAYOUTS", "ViewLayout", "mean_over", "over_pairs", "weighted_sum"]
