"""Non-finite values stop training loudly: the error, and the check that names the culprits."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class NonFiniteError(RuntimeError):
    """A loss, a gradient or an observation became NaN or infinite; the message says which."""


def check_finite(values: torch.Tensor, names: Sequence[str], where: str) -> None:
    """Raise NonFiniteError naming every entry of the 1-D `values` that is NaN or infinite."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = [f"{name}={float(v)}" for name, v, ok in zip(names, values.tolist(),
                                                           finite.tolist(), strict=True) if not ok]
        raise NonFiniteError(f"non-finite {', '.join(bad)} in {where}")
