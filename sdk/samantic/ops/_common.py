from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any) -> np.ndarray:
    """Returns ``x`` as a numpy array; torch tensors are detached and copied to host."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def load_C():
    try:
        from samantic import _C
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise ImportError(
            "samantic's compiled module samantic._C is missing; reinstall with `pip install .` "
            f"(or `make build` in a checkout): {e}"
        ) from e
    return _C
