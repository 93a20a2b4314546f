"""Calibration statistics gathered while the pipeline runs a block: which linears share an
input (the true-sequential groups), and each input's Hessian H = 2/n sum x x^T."""

from __future__ import annotations

import torch

from quant.errors import ModelError
from quant.traverse import BlockRun


class _Stop(Exception):
    pass


def input_groups(run: BlockRun, linears: dict) -> list[list[str]]:
    """Names of `linears` grouped by the input tensor they share, in execution order
    (q/k/v, o, gate/up, down for a Llama block), from one forward of the first batch."""
    # Holding on to the inputs keeps their memory from being reused by a later tensor, so
    # object identity (not address) tells which linears share an input.
    order: list[tuple[str, torch.Tensor]] = []

    def record(name):
        def hook(module, args):
            if all(seen != name for seen, _ in order):
                order.append((name, args[0]))
        return hook

    handles = [linears[name].register_forward_pre_hook(record(name)) for name in linears]
    try:
        with torch.no_grad():
            run.first()
    finally:
        for handle in handles:
            handle.remove()
    groups, last_input = [], None
    for name, x in order:
        if x is not last_input:
            groups.append([])
        groups[-1].append(name)
        last_input = x
    missing = set(linears) - {name for name, _ in order}
    if missing:
        raise ModelError(f"block {run.index}: linears never called in forward: "
                         f"{sorted(missing)}")
    return groups


def collect_hessians(run: BlockRun, groups: list[list[str]],
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """H of each group's shared input over every calibration batch; each batch's forward
    stops as soon as the last of these groups has seen its input. Returns H by linear name."""
    firsts = [group[0] for group in groups]
    sums = {name: None for name in firsts}
    tokens = {"n": 0}

    def accumulate(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(dtype)
            if sums[name] is None:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
            sums[name].addmm_(x.t(), x)
            if name == firsts[0]:
                tokens["n"] += x.shape[0]
            if name == firsts[-1]:
                raise _Stop
        return hook

    handles = [run.block.get_submodule(name).register_forward_pre_hook(accumulate(name))
               for name in firsts]
    try:
        with torch.no_grad():
            for _ in run.batches(stop=_Stop):
                pass
    finally:
        for handle in handles:
            handle.remove()
    hessians = {}
    for group in groups:
        H = sums[group[0]] * (2 / tokens["n"])
        if not torch.isfinite(H).all():  # any NaN/inf activation ends up here
            raise ModelError(f"calibration activations entering {group[0]} in block {run.index} "
                             "contain NaN or inf; the model overflows on this data")
        hessians.update({name: H for name in group})
    return hessians


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor,
                          energy: torch.Tensor | None = None) -> float:
    """||(W_hat - W) X||^2 / ||W X||^2 on the inputs X behind H (= 2/n X X^T); `energy`:
    the denominator, when a caller comparing many W_hat has it (`output_energy`)."""
    delta = W_hat.to(H.dtype) - W.to(H.dtype)
    num = ((delta @ H) * delta).sum()
    den = output_energy(W, H) if energy is None else energy
    return float(num / den.clamp_min(1e-30))


def output_energy(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """||W X||^2 (up to H's factor 2/n)."""
    W = W.to(H.dtype)
    return ((W @ H) * W).sum()
