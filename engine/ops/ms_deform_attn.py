"""Multi-scale deformable attention (Deformable DETR / Grounding DINO).

Public API:

* :func:`ms_deform_attn` -- the fused op ``instagen::ms_deform_attn`` (a ``torch.library``
  custom op with fake/meta and autograd registrations, so it works under autograd and
  ``torch.compile``). CPU tensors run the fused C++ kernel, CUDA tensors the fused CUDA
  kernel; when the compiled kernel for a device is missing the op warns once and falls
  back to :func:`ms_deform_attn_reference`.
* :func:`ms_deform_attn_reference` -- readable PyTorch reference (``grid_sample`` per level).
* :class:`MSDeformAttn` -- the Deformable-DETR attention module.
* :func:`kernel_status` -- which compiled backends are importable.

Tensor contract::

    value               (N, S, M, D)          floating
    spatial_shapes      (L, 2)  int64         (H, W) of each level, sum(H * W) == S
    level_start_index   (L,)    int64         start of each level along S
    sampling_locations  (N, Lq, M, L, P, 2)   normalised (x, y); [0, 1] is the map
    attention_weights   (N, Lq, M, L, P)
    -> output           (N, Lq, M * D)        dtype of value

Sampling is bilinear with zeros outside the map and the ``grid_sample(align_corners=False)``
pixel convention: pixel x = loc_x * W - 0.5.

Precision: float64 inputs compute in float64; everything else accumulates in float32.
``sampling_locations`` / ``attention_weights`` are used at that compute precision whatever
their own dtype, and their gradients come back in their own dtype. The reference computes in
float64 whatever the inputs (``_EXACT`` says why) and returns the inputs' dtypes.
"""
from __future__ import annotations

import importlib
import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_reference", "kernel_status"]

# --------------------------------------------------------------------------- extensions
# Compiled kernels are optional: importing this module never fails because one is missing.
_cpu_ext = None
_cpu_ext_error: str | None = None
try:
    _cpu_ext = importlib.import_module("engine.ops._ms_deform_attn_cpu")
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _cpu_ext_error = f"{type(exc).__name__}: {exc}"

_cuda_ext = None
_cuda_ext_error: str | None = None
try:
    _cuda_ext = importlib.import_module("engine.ops._ms_deform_attn_cuda")
except (ImportError, OSError) as exc:
    _cuda_ext_error = f"{type(exc).__name__}: {exc}"

_warned_fallback: set[str] = set()
_warn_lock = threading.Lock()


def kernel_status() -> dict:
    """Which compiled backends are importable (and why not, when they are not)."""
    return {
        "cpu": _cpu_ext is not None,
        "cuda": _cuda_ext is not None,
        "cpu_error": None if _cpu_ext is not None else _cpu_ext_error,
        "cuda_error": None if _cuda_ext is not None else _cuda_ext_error,
        "cuda_device_available": torch.cuda.is_available(),
        "op": "instagen::ms_deform_attn",
    }


def _extension_for(device: torch.device):
    if device.type == "cpu":
        return _cpu_ext
    if device.type == "cuda":
        return _cuda_ext
    return None


def _warn_fallback(device: torch.device) -> None:
    with _warn_lock:
        if device.type in _warned_fallback:
            return
        _warned_fallback.add(device.type)
    warnings.warn(
        f"instagen::ms_deform_attn: no compiled kernel for device '{device.type}' "
        f"({kernel_status().get(device.type + '_error') or 'unsupported device'}); "
        "falling back to the (slower, memory-hungry) PyTorch reference. Build the kernels "
        "with `pip install --no-build-isolation -e .` (see kernels/README.md).",
        RuntimeWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------- validation
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_metadata(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights) -> None:
    """Shape / dtype / device checks (no data access: safe under fake tensors)."""
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("value", "sampling_locations", "attention_weights"):
        if named[name].dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"ms_deform_attn: {name} must be a floating tensor (float16, bfloat16, float32 "
                f"or float64), got {named[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {named[name].dtype}")
    dev = value.device
    for name, t in named.items():
        if t.device != dev:
            raise ValueError(
                f"ms_deform_attn: {name} is on {t.device} but value is on {dev}; all inputs "
                "must be on the same device")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be 4-D (N, S, M, D), got shape {tuple(value.shape)}")
    N, S, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be (L, 2) with L >= 1, got shape {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be ({L},) to match spatial_shapes, got "
            f"shape {tuple(level_start_index.shape)}")
    if sampling_locations.dim() != 6:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be 6-D (N, Lq, M, L, P, 2), got shape "
            f"{tuple(sampling_locations.shape)}")
    n2, Lq, m2, l2, P, two = sampling_locations.shape
    if (n2, m2, l2, two) != (N, M, L, 2):
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (N={N}, Lq, M={M}, L={L}, P, 2), got "
            f"shape {tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != (N, Lq, M, L, P):
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (N={N}, Lq={Lq}, M={M}, L={L}, P={P}), "
            f"got shape {tuple(attention_weights.shape)}")


def _check_data(value, spatial_shapes, level_start_index) -> None:
    """Checks that read the (tiny) level tables: the kernels index memory with them."""
    if spatial_shapes.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # cannot sync inside a CUDA graph capture; validated on the eager run
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    S = value.shape[1]
    offset = 0
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h <= 0 or w <= 0:
            raise ValueError(
                f"ms_deform_attn: spatial_shapes[{lvl}] = ({h}, {w}) must be positive (H, W)")
        if start != offset:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{lvl}] = {start}, expected {offset} "
                f"(cumulative sum of H*W of spatial_shapes = {shapes})")
        offset += h * w
    if offset != S:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {shapes} cover sum(H*W) = {offset} positions but "
            f"value has S = {S}")


def _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_data(value, spatial_shapes, level_start_index)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- reference
# The reference's precision. grid_sample takes normalised coordinates and turns them back into
# pixels, x = ((2 * loc - 1 + 1) * W - 1) / 2; in float32 that round trip moves a point that lies on
# a pixel centre (about half of RT-DETR's, whose anchors sit on them) a hair to either side, and
# there the bilinear sample has a kink: the gradient for the location jumps between the left and
# the right slope at random. In the toy teacher that was 5-8% of the location gradient, and its
# training went elsewhere (AP50 base 0.30 against the kernel's 0.54). In float64 the round trip
# is exact for float32 locations, so the reference takes the right slope everywhere, as the
# kernels do. The fallback costs twice the memory for it.
_EXACT = torch.float64


def ms_deform_attn_reference(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Readable PyTorch reference: one ``grid_sample`` per level (differentiable by autograd).

    Computes in float64 and returns ``value.dtype``: see ``_EXACT``.
    """
    _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype = value.dtype
    value = value.to(_EXACT)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample takes coordinates in [-1, 1]
    sampling_grids = 2 * sampling_locations.to(value.dtype) - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = sampling_grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return output.transpose(1, 2).to(out_dtype).contiguous()


def _reference_backward(grad_output, value, spatial_shapes, level_start_index,
                        sampling_locations, attention_weights):
    """Analytic backward of the reference, without autograd (custom-op kernels run below the
    autograd dispatch key): ``aten::grid_sampler_2d_backward`` per level."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    dt = _EXACT
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    grids = (2 * sampling_locations.to(dt) - 1)
    weights = attention_weights.to(dt).transpose(1, 2).reshape(N * M, Lq, L, P)
    # (N, Lq, M*D) -> (N*M, D, Lq)
    g = grad_output.to(dt).reshape(N, Lq, M, D).permute(0, 2, 3, 1).reshape(N * M, D, Lq)
    grad_value, grad_grid, grad_weight = [], [], []
    for lvl, (h, w) in enumerate(shapes):
        start = int(level_start_index[lvl])
        value_l = value[:, start:start + h * w].to(dt).flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (N*M, D, Lq, P)
        w_l = weights[:, :, lvl]  # (N*M, Lq, P)
        grad_weight.append((sampled * g.unsqueeze(-1)).sum(1))  # (N*M, Lq, P)
        grad_sampled = g.unsqueeze(-1) * w_l.unsqueeze(1)  # (N*M, D, Lq, P)
        gv, gg = torch.ops.aten.grid_sampler_2d_backward(
            grad_sampled.contiguous(), value_l.contiguous(), grid_l.contiguous(), 0, 0, False,
            [True, True])
        # (N*M, D, H, W) -> (N, H*W, M, D)
        grad_value.append(gv.reshape(N, M, D, h * w).permute(0, 3, 1, 2))
        grad_grid.append(gg)  # (N*M, Lq, P, 2)
    grad_value = torch.cat(grad_value, dim=1)
    # d grid / d loc = 2
    grad_loc = (2 * torch.stack(grad_grid, dim=2)).reshape(N, M, Lq, L, P, 2).transpose(1, 2)
    grad_attn = torch.stack(grad_weight, dim=2).reshape(N, M, Lq, L, P).transpose(1, 2)
    return (grad_value.to(value.dtype).contiguous(),
            grad_loc.to(sampling_locations.dtype).contiguous(),
            grad_attn.to(attention_weights.dtype).contiguous())


# --------------------------------------------------------------------------- custom op
# Defined with the low-level torch.library API (schema + one CompositeExplicitAutograd kernel
# that dispatches by device, + register_fake + register_autograd). Unlike
# torch.library.custom_op it does not import torch._dynamo on the first call (~2 s).
_FWD_SCHEMA = ("ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
               "Tensor sampling_locations, Tensor attention_weights) -> Tensor")
_BWD_SCHEMA = ("ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
               "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
               "-> (Tensor, Tensor, Tensor)")


def _ms_deform_attn_impl(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                         sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ext = _extension_for(value.device)
    if ext is None:
        _warn_fallback(value.device)
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights)
    cdt = _compute_dtype(value.dtype)
    # CPU kernel: float32/float64 only; CUDA kernel: value in its own dtype (fp32 accumulation)
    v = value.to(cdt) if value.device.type == "cpu" else value
    out = ext.forward(v.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                      sampling_locations.to(cdt).contiguous(),
                      attention_weights.to(cdt).contiguous())
    return out.to(value.dtype)


def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations,
                         attention_weights):
    _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


def _ms_deform_attn_backward_impl(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                                  level_start_index: Tensor, sampling_locations: Tensor,
                                  attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    if tuple(grad_output.shape) != (N, Lq, M * D):
        raise ValueError(f"ms_deform_attn_backward: grad_output must be ({N}, {Lq}, {M * D}), "
                         f"got {tuple(grad_output.shape)}")
    ext = _extension_for(value.device)
    if ext is None:
        _warn_fallback(value.device)
        return _reference_backward(grad_output, value, spatial_shapes, level_start_index,
                                   sampling_locations, attention_weights)
    cdt = _compute_dtype(value.dtype)
    if value.device.type == "cpu":
        v, g = value.to(cdt), grad_output.to(cdt)
    else:
        v, g = value, grad_output.to(value.dtype)
    grad_value, grad_loc, grad_attn = ext.backward(
        g.contiguous(), v.contiguous(), spatial_shapes.contiguous(),
        level_start_index.contiguous(), sampling_locations.to(cdt).contiguous(),
        attention_weights.to(cdt).contiguous())
    return (grad_value.to(value.dtype).contiguous(),
            grad_loc.to(sampling_locations.dtype).contiguous(),
            grad_attn.to(attention_weights.dtype).contiguous())


def _ms_deform_attn_backward_fake(grad_output, value, spatial_shapes, level_start_index,
                                  sampling_locations, attention_weights):
    _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.instagen.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations,
        attention_weights)
    return grad_value, None, None, grad_loc, grad_attn


def _register() -> torch.library.Library | None:
    if hasattr(torch.ops.instagen, "ms_deform_attn"):  # module imported twice under two names
        return None
    lib = torch.library.Library("instagen", "FRAGMENT")  # other instagen:: ops may exist
    lib.define(_FWD_SCHEMA)
    lib.define(_BWD_SCHEMA)
    # one kernel for every device: it picks the compiled kernel or the reference fallback
    lib.impl("ms_deform_attn", _ms_deform_attn_impl, "CompositeExplicitAutograd")
    lib.impl("ms_deform_attn_backward", _ms_deform_attn_backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake("instagen::ms_deform_attn", _ms_deform_attn_fake, lib=lib)
    torch.library.register_fake("instagen::ms_deform_attn_backward", _ms_deform_attn_backward_fake,
                                lib=lib)
    torch.library.register_autograd("instagen::ms_deform_attn", _backward,
                                    setup_context=_setup_context, lib=lib)
    return lib


_LIB = _register()


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Fused multi-scale deformable attention; see the module docstring for the contract.

    Raises TypeError / ValueError (naming the offending tensor) on malformed inputs.
    """
    _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.instagen.ms_deform_attn(value, spatial_shapes, level_start_index,
                                             sampling_locations, attention_weights)


# --------------------------------------------------------------------------- module
class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021).

    Args:
        d_model: hidden size C.
        n_levels: number of feature levels L.
        n_heads: number of attention heads M (must divide d_model).
        n_points: sampling points per head per level P.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        for name, v in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads),
                        ("n_points", n_points)):
            if v <= 0:
                raise ValueError(f"MSDeformAttn: {name} must be positive, got {v}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # grid init: head h looks in direction 2*pi*h/M, point p at distance p+1
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
        grid_init = grid_init.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: Tensor, input_level_start_index: Tensor,
                input_padding_mask: Tensor | None = None) -> Tensor:
        """
        query (N, Lq, C); reference_points (N, Lq, L, 2) normalised (x, y) in [0, 1] or
        (N, Lq, L, 4) boxes (cx, cy, w, h); input_flatten (N, S, C); input_spatial_shapes
        (L, 2) int64; input_level_start_index (L,) int64; input_padding_mask (N, S) bool,
        True = padding. Returns (N, Lq, C).
        """
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn: query must be (N, Lq, {self.d_model}), got {tuple(query.shape)}")
        N, Lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn: input_flatten must be ({N}, S, {self.d_model}), got "
                             f"{tuple(input_flatten.shape)}")
        S = input_flatten.shape[1]
        if (reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (N, Lq, self.n_levels)
                or reference_points.shape[-1] not in (2, 4)):
            raise ValueError(f"MSDeformAttn: reference_points must be ({N}, {Lq}, {self.n_levels}, 2 or 4), "
                             f"got {tuple(reference_points.shape)}")
        if tuple(input_spatial_shapes.shape) != (self.n_levels, 2):
            raise ValueError(f"MSDeformAttn: input_spatial_shapes must be ({self.n_levels}, 2), got "
                             f"{tuple(input_spatial_shapes.shape)}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if input_padding_mask.dtype != torch.bool or tuple(input_padding_mask.shape) != (N, S):
                raise ValueError(f"MSDeformAttn: input_padding_mask must be a bool ({N}, {S}) tensor, "
                                 f"got {input_padding_mask.dtype} {tuple(input_padding_mask.shape)}")
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            N, Lq, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(
            N, Lq, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(
            N, Lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W, H)
            offset_normalizer = torch.stack(
                [input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1).to(sampling_offsets.dtype)
            sampling_locations = (reference_points[:, :, None, :, None, :]
                                  + sampling_offsets / offset_normalizer[None, None, None, :, None, :])
        else:
            sampling_locations = (reference_points[:, :, None, :, None, :2]
                                  + sampling_offsets / self.n_points
                                  * reference_points[:, :, None, :, None, 2:] * 0.5)
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                                sampling_locations, attention_weights)
        return self.output_proj(output)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}")
