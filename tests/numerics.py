"""Error measures shared by the kernel and op tests."""

from __future__ import annotations

import numpy as np


def nmse(y, ref) -> float:
    """Normalised mean squared error of y against ref, in float64."""
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(((y - ref) ** 2).sum() / (ref ** 2).sum())


def int8_error_power(xa, w) -> float:
    """Expected sum of squared output errors of xa [n_tok, n_in] · w[n_out, n_in]^T when xa is
    rounded to int8 per block of 32 (step s_b = max|x_block| / 127, error variance s_b^2 / 12)."""
    amax = np.abs(xa.astype(np.float32)).reshape(xa.shape[0], -1, 32).max(axis=-1)
    var = np.repeat((amax.astype(np.float64) / 127) ** 2 / 12, 32, axis=1)          # [n_tok, n_in]
    return float((var @ (w ** 2).T).sum())
