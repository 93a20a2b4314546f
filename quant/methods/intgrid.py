"""The uniform integer grid shared by integer methods (RTN, GPTQ, mixed).

GPTQ's quantizer: the range [min, max] of a group is extended to include 0, the zero
point is an integer, and the scale is rounded to fp16 first because that is what is stored.
Symmetric grids put the zero point at 2**(bits-1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quant.formats.int_weight import check_int_config, int_config
from quant.methods.base import LayerSpec, Method

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): keeps scales non-zero


def fit_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [rows] for each row of w [rows, n] (fp32, or fp64 when w is fp64);
    zero is integer-valued."""
    maxq = (1 << bits) - 1
    w = w if w.dtype == torch.float64 else w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).half().to(w.dtype).clamp(min=FP16_TINY)
    if sym:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """Integers q = clamp(round(w / scale) + zero) for w [rows, n], scale/zero [rows] or [rows, 1]."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w.to(scale.dtype) / scale) + zero, 0, (1 << bits) - 1)


def dequant_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return scale * (q - zero)


def effective_group_size(group_size: int | None, in_features: int, default: int = 128) -> int:
    """The group size to use for a layer; None picks `default`, or the largest power of two
    below it that divides the input dim, or one group per channel (-1)."""
    if group_size is not None:
        return group_size
    size = default
    while size >= 16:
        if in_features % size == 0:
            return size
        size //= 2
    return -1


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest of w [out, in] in groups along the input dim.

    Returns q [out, in] int32, zeros [ngroups, out] int32, scales [ngroups, out] fp32.
    """
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    groups = w.float().reshape(out_features * (in_features // size), size)
    scale, zero = fit_grid(groups, bits, sym)
    q = round_to_grid(groups, scale, zero, bits).reshape(out_features, in_features)
    ngroups = in_features // size
    return (q.to(torch.int32), zero.view(out_features, ngroups).t().to(torch.int32).contiguous(),
            scale.view(out_features, ngroups).t().contiguous())


@dataclass(frozen=True)
class IntGridOptions:
    """The options every integer-grid method shares."""

    bits: int = field(default=4, metadata={
        "help": "rtn, gptq: bits per weight: 2, 3, 4, 5, 6 or 8 (default 4)"})
    group_size: int | None = field(default=None, metadata={
        "help": "input columns per scale/zero group; -1 = one group per output channel "
                "(default: 128, or the largest power of two dividing the layer's input dim)"})
    sym: bool = field(default=False, metadata={"help": "symmetric grid (zero point fixed at 2^(b-1))"})

    def validate(self):
        check_int_config(self.bits, 128 if self.group_size is None else self.group_size)
        return self


class IntGridMethod(Method):
    """What the integer-grid methods share: a layer's plan and the 2-bit caution."""

    def stores_g_idx(self, group_size: int) -> bool:
        """Whether a layer with this group size stores act-order's g_idx."""
        return False

    def plan_layer(self, name: str, out_features: int, in_features: int) -> LayerSpec:
        c = self.config
        group_size = effective_group_size(c.group_size, in_features)
        check_int_config(c.bits, group_size, in_features)
        return LayerSpec(out_features, in_features,
                         int_config(c.bits, group_size, c.sym, self.stores_g_idx(group_size)))

    def caution(self) -> str | None:
        if self.config.bits <= 2:
            return ("2-bit integer grids lose most of a model's quality (see the README's "
                    "GPTQ table); --method aqlm --bits 2 keeps it")
        return None

    def label(self) -> str:
        return f"{self.name}-{self.config.bits}bit"
