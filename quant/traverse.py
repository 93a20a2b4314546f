"""Model traversal, written once for every architecture: find the repeated decoder blocks,
the linears inside them, and capture what each block receives."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from quant.errors import ModelError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks): the ModuleList of same-typed modules holding the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and \
                len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ModelError(f"{type(model).__name__}: no repeated decoder blocks found")
    return best


def find_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """nn.Linear submodules in registration order, by name relative to `module`."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not any(name == s or name.endswith("." + s)
                                                    for s in skip)}


def move(obj, device):
    """Move the tensors inside nested tuples/lists/dicts to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a block while capturing: records its call, passes hidden states on."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class BlockInputs:
    """What the blocks receive for each calibration batch."""

    hidden: list[torch.Tensor]             # [batch] of [b, seq, hidden]: input of the next block
    calls: list[list[tuple[tuple, dict]]]  # [block][batch] (extra args, kwargs); tensors shared


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                         batch_size: int) -> BlockInputs:
    """Run the model up to its blocks for each batch of `input_ids` [n, seq] (on the model's
    device), without running any block."""
    calls = [[] for _ in blocks]
    originals = list(blocks)
    try:
        for i in range(len(blocks)):
            blocks[i] = _Recorder(calls[i], last=i == len(blocks) - 1)
        with torch.no_grad():
            for batch in input_ids.split(batch_size):
                with contextlib.suppress(_Stop):
                    model(input_ids=batch, use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if any(len(c) != len(calls[0]) for c in calls):
        raise ModelError(f"{type(model).__name__}: not every decoder block ran once per batch; "
                         "this architecture is not supported")
    hidden = [h for h, _, _ in calls[0]]
    return BlockInputs(hidden, [[(a, k) for _, a, k in block_calls] for block_calls in calls])


def run_block(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict],
              device) -> torch.Tensor:
    args, kwargs = call
    out = block(hidden.to(device), *move(args, device), **move(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out
