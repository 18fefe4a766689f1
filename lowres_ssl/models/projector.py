"""The projector (expander) head: an MLP from backbone features to the embedding the loss sees.

A spec such as ``"2048-2048-8192"`` lists the output width of each Linear layer:

    Linear(in, 2048) → BatchNorm1d → ReLU → Linear(2048, 2048) → BatchNorm1d → ReLU
    → Linear(2048, 8192, bias=False)

as in VICReg / SFRIK's reference code. The last width is q, the embedding dimension.
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError

_EXAMPLE = "2048-2048-8192"


def parse_projector_spec(spec: str | int) -> list[int]:
    """The layer widths of ``spec`` (e.g. ``"2048-2048-8192"`` → [2048, 2048, 8192]).

    An int (YAML reads ``projector: 8192`` as one) is taken as a single width. Raises
    :class:`~lowres_ssl.errors.UserError` unless the spec is positive ints joined by ``-``.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str):
        raise UserError(
            f"bad projector spec {spec!r}; expected positive widths joined by '-', "
            f"e.g. '{_EXAMPLE}'"
        )
    parts = spec.strip().split("-")
    # isdigit() alone would accept '²' and other Unicode digits that int() rejects.
    if not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(
            f"bad projector spec {spec!r}; expected positive widths joined by '-', "
            f"e.g. '{_EXAMPLE}'"
        )
    return [int(p) for p in parts]


def projector_out_dim(spec: str | int) -> int:
    """q, the output width of the projector ``spec`` (its last width)."""
    return parse_projector_spec(spec)[-1]


def build_projector(in_dim: int, spec: str | int) -> nn.Sequential:
    """The projector MLP for ``spec``, mapping (B, in_dim) → (B, q).

    Each width but the last gives Linear → BatchNorm1d → ReLU; the last gives a bias-free
    Linear with nothing after it, as in the reference code. A single width is one bias-free
    Linear.

    Parameter count, with widths w_1 … w_k and w_0 = in_dim:
    Σ_{i<k} (w_{i−1}·w_i + w_i + 2·w_i) + w_{k−1}·w_k.
    """
    if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim must be a positive int, got {in_dim!r}")
    widths = parse_projector_spec(spec)
    layers: list[nn.Module] = []
    prev = in_dim
    for width in widths[:-1]:
        # The Linear bias before BN is redundant (BN removes it) but kept for parity with the
        # reference code, so parameter counts and checkpoints line up.
        layers += [nn.Linear(prev, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        prev = width
    layers.append(nn.Linear(prev, widths[-1], bias=False))
    return nn.Sequential(*layers)
