"""Custom operators (compiled kernels with PyTorch fallbacks).

Importing this package never fails because a compiled kernel is missing; see
:func:`kernel_status`.
"""
from engine.ops.ms_deform_attn import (
    MSDeformAttn,
    kernel_status,
    ms_deform_attn,
    ms_deform_attn_reference,
)

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_reference", "kernel_status"]
