"""Model traversal, written once for every architecture: find the repeated decoder blocks,
the linears inside them, and capture what each block receives."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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


def map_tensors(obj, fn):
    """`fn` applied to the tensors inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def move(obj, device):
    """Move the tensors inside nested tuples/lists/dicts to `device`."""
    return map_tensors(obj, lambda t: t.to(device))


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

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """A block's outputs become the next block's inputs (kept where the inputs live)."""
        self.hidden = [out.to(h.device) for h, out in zip(self.hidden, outputs)]

    def subset(self, batches) -> "BlockInputs":
        """The same inputs for only the calibration batches numbered `batches`."""
        return BlockInputs([self.hidden[b] for b in batches],
                           [[calls[b] for b in batches] for calls in self.calls])

    def rows(self, index: int, batch: int, rows: slice) -> tuple[torch.Tensor, tuple]:
        """(hidden, call) of block `index` for some sequences of one batch: every tensor
        whose first dimension is the batch's (masks too) is cut to `rows`."""
        hidden = self.hidden[batch]

        def cut(t):
            return t[rows] if t.dim() and t.shape[0] == hidden.shape[0] else t

        return hidden[rows], map_tensors(self.calls[index][batch], cut)


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


class _Replaying(nn.Module):
    """Stands in for a finished child: computes its output once per batch, then replays it."""

    def __init__(self, name: str, child: nn.Module, replay: "ChildReplay"):
        super().__init__()
        self.name, self.child, self.replay, self.outputs = name, child, replay, {}

    def forward(self, *args, **kwargs):
        batch = self.replay.batch
        if batch not in self.outputs:
            shortcut = self.replay.tail_output(self.name, batch)
            self.outputs[batch] = self.child(*args, **kwargs) if shortcut is None else shortcut
        return self.outputs[batch]


@dataclass
class _Tail:
    """A child whose output is its linear `linear`'s output, alone (arity None) or first in
    a tuple of `arity` whose other entries are None (attention without weights)."""

    linear: str
    arity: int | None


class ChildReplay:
    """While a block is quantized, replays the outputs of its children (attention, MLP)
    whose linears are all quantized. Such a child's input comes only from modules that ran
    before it, whose linears run earlier and are therefore quantized too, so every later
    pass over the same batch would recompute exactly the same output.

    A child that ends in one of its linears (o_proj, down_proj: its "tail") need not be
    recomputed at all when, in true-sequential order, the tail's input was recorded in the
    pass that collected the tail's own statistics: everything upstream of the tail was
    final by then, so the child's output is the quantized tail applied to that input.

    Set `batch` to the index of the calibration batch before each forward; call
    `refresh()` before each pass to start replaying newly finished children."""

    def __init__(self, block: nn.Module, linears: dict[str, nn.Module]):
        self.block, self.batch = block, None
        self.children: dict[str, list[str]] = {}
        for name in linears:
            child, _, rest = name.partition(".")
            if rest:
                self.children.setdefault(child, []).append(name)
        self.originals: dict[str, nn.Module] = {}
        self.tails: dict[str, _Tail] = {}
        self.tail_inputs: dict[str, dict[int, tuple[torch.Tensor, torch.device]]] = {}

    def refresh(self) -> None:
        from quant.layers import QuantLinear

        for child, names in self.children.items():
            if child not in self.originals and all(
                    isinstance(self.block.get_submodule(n), QuantLinear) for n in names):
                self.originals[child] = getattr(self.block, child)
                setattr(self.block, child, _Replaying(child, self.originals[child], self))

    def restore(self) -> None:
        for child, module in self.originals.items():
            setattr(self.block, child, module)
        self.originals.clear()
        self.tail_inputs.clear()

    @contextlib.contextmanager
    def learning_tails(self):
        """Find, during the forwards run inside, the children whose output is exactly
        (the same tensor object as) the output of one of their linears."""
        produced = {}

        def linear_hook(name):
            def hook(module, args, output):
                produced[name] = output
            return hook

        def child_hook(child):
            def hook(module, args, output):
                first, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
                if rest is not None and any(r is not None for r in rest):
                    return
                for name in self.children[child]:
                    if produced.get(name) is first:
                        self.tails[child] = _Tail(name, None if rest is None else len(output))
            return hook

        handles = [self.block.get_submodule(n).register_forward_hook(linear_hook(n))
                   for names in self.children.values() for n in names]
        handles += [getattr(self.block, c).register_forward_hook(child_hook(c))
                    for c in self.children]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def recording_tail_inputs(self, names: list[str]):
        """Keep the input of each tail linear among `names` for every batch run inside.
        Only sound in a pass after every linear upstream of `names` is final."""
        def record(child):
            def hook(module, args):
                x = args[0].detach()
                self.tail_inputs.setdefault(child, {})[self.batch] = (x.to("cpu"), x.device)
            return hook

        handles = [self.block.get_submodule(tail.linear)
                   .register_forward_pre_hook(record(child), prepend=True)
                   for child, tail in self.tails.items() if tail.linear in names]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def tail_output(self, child: str, batch: int):
        """The child's output for `batch` from its tail's recorded input, or None."""
        recorded = self.tail_inputs.get(child, {}).pop(batch, None)
        if recorded is None:
            return None
        tail, (x, device) = self.tails[child], recorded
        out = self.originals[child].get_submodule(tail.linear.partition(".")[2])(x.to(device))
        return out if tail.arity is None else (out,) + (None,) * (tail.arity - 1)


@dataclass
class BlockRun:
    """One decoder block at work in the pipeline: the block, what it receives for every
    calibration batch, the device it runs on and, while its linears are being quantized,
    the replay of its finished children (`replaying`). `on_step` hears what the run is
    doing (the progress bar's text)."""

    block: nn.Module
    inputs: BlockInputs
    index: int
    device: torch.device
    name: str = ""  # the block's module name, e.g. "model.layers.3"
    replay: ChildReplay | None = None
    on_step: Callable[[str], None] = field(default=lambda step: None, repr=False)

    def forward(self, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
        return run_block(self.block, hidden, call, self.device)

    def first(self) -> torch.Tensor:
        """The block's output for the first calibration batch (nothing replayed)."""
        return self.forward(self.inputs.hidden[0], self.inputs.calls[self.index][0])

    def batches(self, stop: type[Exception] | None = None) -> Iterator[torch.Tensor | None]:
        """The block's output for each calibration batch (None where `stop` cut it short),
        finished children replayed while `replaying`."""
        if self.replay is not None:
            self.replay.refresh()
        for b, (hidden, call) in enumerate(zip(self.inputs.hidden, self.inputs.calls[self.index])):
            if self.replay is not None:
                self.replay.batch = b
            try:
                yield self.forward(hidden, call)
            except Exception as exc:
                if stop is None or not isinstance(exc, stop):
                    raise
                yield None

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The block's outputs become the next block's inputs."""
        self.inputs.advance(outputs)

    def subset(self, batches) -> "BlockRun":
        """The same block on only the calibration batches numbered `batches`."""
        return BlockRun(self.block, self.inputs.subset(batches), self.index, self.device,
                        self.name)

    def rows(self, batch: int, rows: slice) -> tuple[torch.Tensor, tuple]:
        """(hidden, call) for some sequences of one batch (BlockInputs.rows)."""
        return self.inputs.rows(self.index, batch, rows)

    @contextlib.contextmanager
    def replaying(self, linears: dict[str, nn.Module]):
        """Replay the outputs of children whose `linears` are all quantized (ChildReplay)."""
        self.replay = ChildReplay(self.block, linears)
        try:
            yield self.replay
        finally:
            self.replay.restore()
            self.replay = None
