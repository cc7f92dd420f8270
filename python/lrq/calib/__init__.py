"""lrq.calib: calibration of LRQ models on text.

- ``data``: calibration token windows (``calibration_windows``);
- ``activations``: the full-precision source's block inputs / outputs and linear-input
  statistics (``SourceActivations``);
- ``gptq``: Hessian-aware base quantizers (GPTQ, importance-weighted scale search);
- ``replica``: a differentiable torch form of FORMAT.md's replica dequantization;
- ``calibrate``: block-by-block fitting of per-replica parameters (``lrq-calibrate``).
"""

from .data import CalibError, calibration_windows, check_source, load_text

__all__ = ["CalibError", "calibration_windows", "check_source", "load_text"]
