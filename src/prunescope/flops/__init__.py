"""FLOPs and parameter counting on the shared trace.

``flops`` are **MACs** (multiply-accumulates), bias adds not counted, over the whole input as given — the
convention of NNI and of torchvision's published ``_ops`` figures. ``FlopsReport.total_flops_fp`` gives
floating-point operations (2 × MACs for multiply-accumulate ops).
"""

from .counter import FlopsReport, LayerRow, count_flops_params, flops_report
from .formulas import FORMULAS, register_formula

__all__ = ["count_flops_params", "flops_report", "FlopsReport", "LayerRow", "register_formula", "FORMULAS"]
