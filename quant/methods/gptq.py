"""GPTQ (Frantar et al., 2022): quantize W column by column, each column's rounding error
pushed onto the columns not yet quantized through the inverse Hessian of the layer's
inputs, H = 2/n sum x x^T. The paper's names: H, Hinv, W, Q, Err, blocksize, percdamp.

The core (`gptq`) takes tensors and returns tensors; the pipeline collects H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from quant.errors import ConfigError, ModelError
from quant.formats.int_weight import IntWeight
from quant.methods.base import Calibration, LayerSpec, register_method
from quant.methods.intgrid import (IntGridMethod, IntGridOptions, dequant_grid, fit_grid,
                                   round_to_grid)

DAMP_RETRIES = 6  # each retry multiplies the damping by 10


@dataclass
class GPTQResult:
    q: torch.Tensor              # [out, in] integers, original column order
    zeros: torch.Tensor          # [ngroups, out]
    scales: torch.Tensor         # [ngroups, out]
    g_idx: torch.Tensor | None   # [in] group of each column (act-order), else None
    losses: torch.Tensor         # [out] per row: sum over columns of (w - q)^2 / Hinv_ii^2 / 2
    damp: float                  # the damping that made H positive definite
    dead_columns: int            # columns whose inputs were always zero


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1, raising the damping until it factors."""
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp * mean_diag
    for _ in range(DAMP_RETRIES):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            return Hinv, damp / mean_diag
        damp *= 10
    raise ModelError("the Hessian is not positive definite even with damping "
                     f"{damp / mean_diag:.0e} x mean(diag H); check the calibration data")


def gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int, sym: bool,
         act_order: bool = False, static_groups: bool = False, blocksize: int = 128,
         percdamp: float = 0.01) -> GPTQResult:
    """GPTQ of W [out, in] given H [in, in]; computes in H's dtype (fp32 or fp64)."""
    W = W.to(H.dtype).clone()
    H = H.clone()
    out_features, columns = W.shape
    size = columns if group_size == -1 else group_size
    if size < blocksize and blocksize % size:
        blocksize = size  # a group never straddles a block, so it is fit on updated columns

    dead = torch.diag(H) == 0
    H[dead, dead] = 1  # never-active inputs: quantized by plain rounding, no error spread
    fixed = static_groups or group_size == -1
    # grids[g] = (scale, zero) [out] of group g: fixed up front on the original columns, or
    # fit when the loop reaches a group's first column (groups run in loop order)
    grids = [fit_grid(W[:, g:g + size], bits, sym) for g in range(0, columns, size)] if fixed else []

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = _inverse_cholesky(H, percdamp)

    Q = torch.zeros_like(W)
    Losses = torch.zeros(out_features, dtype=W.dtype, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if fixed:
                scale, zero = grids[(int(perm[col]) if perm is not None else col) // size]
            elif col % size == 0:
                group = W1[:, i:i + size] if size <= blocksize else W[:, col:col + size]
                scale, zero = fit_grid(group, bits, sym)
                grids.append((scale, zero))
            w, d = W1[:, i], Hinv1[i, i]
            q = round_to_grid(w[:, None], scale, zero, bits)[:, 0]
            Q[:, col] = q
            err = (w - dequant_grid(q[:, None], scale, zero)[:, 0]) / d
            Losses += err.pow(2) / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        position = torch.argsort(perm)  # loop position of each original column
        Q = Q[:, position]
        if not fixed:
            g_idx = (position // size).to(torch.int32)
    scales = torch.stack([scale for scale, _ in grids]).float()
    zeros = torch.stack([zero for _, zero in grids]).to(torch.int32)
    return GPTQResult(Q.to(torch.int32), zeros, scales, g_idx, Losses, damp, int(dead.sum()))


HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class GPTQConfig(IntGridOptions):
    act_order: bool = field(default=True, metadata={
        "help": "quantize columns by descending Hessian diagonal (desc_act; stores g_idx); "
                "on by default"})
    static_groups: bool = field(default=False, metadata={
        "help": "with --act-order: fix group grids before the column loop, so no g_idx is "
                "needed at inference"})
    true_sequential: bool = field(default=True, metadata={
        "help": "quantize a block's linears in execution order, each on inputs that went "
                "through the already quantized ones"})
    percdamp: float = field(default=0.01, metadata={
        "help": "damping added to diag(H), as a fraction of its mean"})
    blocksize: int = field(default=128, metadata={"help": "columns per lazy-update block"})
    hessian_dtype: str = field(default="float32", metadata={
        "help": "float32 or float64 for H and the column loop"})

    def validate(self) -> "GPTQConfig":
        super().validate()
        if self.static_groups and not self.act_order:
            raise ConfigError("--static-groups changes nothing without --act-order; add "
                              "--act-order or drop --static-groups")
        if not 0 <= self.percdamp < 1 or not math.isfinite(self.percdamp):
            raise ConfigError(f"--percdamp must be in [0, 1) (got {self.percdamp})")
        if self.blocksize < 1:
            raise ConfigError(f"--blocksize must be positive (got {self.blocksize})")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise ConfigError("--hessian-dtype must be float32 or float64")
        return self


@register_method("gptq")
class GPTQ(IntGridMethod):
    Config = GPTQConfig

    @property
    def calibration(self) -> Calibration:
        return Calibration(nsamples=128, hessian=True,
                           hessian_dtype=HESSIAN_DTYPES[self.config.hessian_dtype],
                           true_sequential=self.config.true_sequential)

    def stores_g_idx(self, group_size: int) -> bool:
        # static groups and one group per channel keep the groups contiguous: no g_idx
        c = self.config
        return c.act_order and not c.static_groups and group_size != -1

    def quantize(self, weight: torch.Tensor, stats: torch.Tensor,
                 spec: LayerSpec) -> tuple[IntWeight, dict]:
        return self.quantize_group([weight], stats, [spec])[0]

    def quantize_group(self, weights: list[torch.Tensor], stats: torch.Tensor,
                       specs: list[LayerSpec]) -> list[tuple[IntWeight, dict]]:
        """Linears sharing an input share H, and GPTQ treats rows independently: one column
        loop over their stacked rows gives each the result it would get alone."""
        c, layer = self.config, specs[0].config
        if any(spec.config != layer for spec in specs):
            return [self.quantize(w, stats, spec) for w, spec in zip(weights, specs)]
        result = gptq(torch.cat(weights), stats.to(HESSIAN_DTYPES[c.hessian_dtype]),
                      bits=layer["bits"], group_size=layer["group_size"], sym=layer["sym"],
                      act_order=c.act_order, static_groups=c.static_groups,
                      blocksize=c.blocksize, percdamp=c.percdamp)
        out, start = [], 0
        for weight in weights:
            rows = slice(start, start + weight.shape[0])
            start = rows.stop
            fmt = IntWeight.from_ints(result.q[rows], result.zeros[:, rows],
                                      result.scales[:, rows], bits=layer["bits"],
                                      group_size=layer["group_size"], sym=layer["sym"],
                                      g_idx=None if result.g_idx is None
                                      else result.g_idx.clone())  # each layer owns its tensors
            out.append((fmt, {"gptq_loss": float(result.losses[rows].sum()),
                              "damp": result.damp, "dead_columns": result.dead_columns}))
        return out
