"""Initial per-replica parameters written by the converter (docs/FORMAT.md "Replica initialisation").

Replica 0 uses the quantizer's own parameters: no tensors.  Replica r >= 1 starts from the same
codes with per-output-channel tensors (shape [n_out, 1], F16):

    scale_mult  = 1 + s_r * scale_delta       grid_offset = s_r * grid_offset
    s_r = +1, -1, +2, -2, ... for r = 1, 2, 3, 4, ...   (s_r = (-1)^(r+1) * ceil(r / 2))

so replicas come in mirrored pairs around the base grid (a half-step offset, --grid-offset 0.5,
puts replica 1's levels between replica 0's).  A parameter whose initial value is the default
(scale_delta = 0 or grid_offset = 0) is not written: the replica then starts as an exact copy,
for calibration to move.  Only LRQ weights carry replica tensors.
"""

from __future__ import annotations

import numpy as np


def replica_sign(replica: int) -> int:
    if replica < 1:
        raise ValueError("replica 0 has no initial tensors")
    return (1 if replica % 2 else -1) * ((replica + 1) // 2)


def initial_params(n_out: int, replica: int, scale_delta: float, grid_offset: float) -> dict[str, np.ndarray]:
    """{param: F16 array [n_out, 1]} of replica ``replica`` (empty for replica 0 / defaults)."""
    if replica == 0:
        return {}
    s = replica_sign(replica)
    out: dict[str, np.ndarray] = {}
    if scale_delta:
        out["scale_mult"] = np.full((n_out, 1), 1.0 + s * scale_delta, dtype=np.float16)
    if grid_offset:
        out["grid_offset"] = np.full((n_out, 1), s * grid_offset, dtype=np.float16)
    return out


def initial_param_names(scale_delta: float, grid_offset: float) -> tuple[str, ...]:
    """Which parameters a replica r >= 1 gets (same for every replica and weight)."""
    return tuple(p for p, v in (("scale_mult", scale_delta), ("grid_offset", grid_offset)) if v)
