"""Block fine-tuning, a pipeline stage after a block's linears are quantized: with the
discrete parts (codes) frozen, Adam tunes the continuous parts of each quantized layer's
format (AQLM codebooks and scales) and the block's norms so that the block reproduces the
fp block's outputs on the calibration batches.

A format takes part when it has `tunable()` (fp32 copies of its continuous tensors),
`dequantize_tunable(parts)` (the dense weight, differentiable in the parts) and
`with_tunable(parts)` (a new format with the parts rounded to their stored dtypes).
"""

from __future__ import annotations

import torch

from quant.layers import QuantLinear
from quant.methods.base import FinetuneConfig
from quant.traverse import BlockInputs, run_batches, run_block

CHECK_EVERY = 4  # the error before and after tuning is compared on every 4th batch


def block_outputs(block, inputs: BlockInputs, index: int, device) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch, on the CPU (the fp targets)."""
    with torch.no_grad():
        return [out.to("cpu") for out in run_batches(block, inputs, index, device)]


def relative_error(block, inputs: BlockInputs, index: int, device,
                   targets: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """(sum ||block(x) - target||^2 / sum ||target||^2 over every calibration batch, the
    block's outputs)."""
    with torch.no_grad():
        outputs = list(run_batches(block, inputs, index, device))
    return output_error(outputs, targets), outputs


def output_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    num = den = 0.0
    for out, target in zip(outputs, targets):
        err, norm = _squared(out, target)
        num, den = num + float(err), den + float(norm)
    return num / max(den, 1e-30)


def _squared(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||out - target||^2, ||target||^2) in fp32, differentiable in `out`."""
    target = target.to(out.device, out.dtype)
    return (out - target).float().pow(2).sum(), target.float().pow(2).sum()


def tunable_layers(block) -> dict[str, QuantLinear]:
    return {name: m for name, m in block.named_modules()
            if isinstance(m, QuantLinear) and hasattr(m.quantized_weight(), "tunable")}


def norm_parameters(block) -> list[torch.nn.Parameter]:
    """The block's 1-D float parameters outside its quantized layers: the norms' weights
    (and biases)."""
    quantized = {id(p) for m in block.modules() if isinstance(m, QuantLinear)
                 for p in m.parameters()}
    return [p for p in block.parameters()
            if id(p) not in quantized and p.is_floating_point() and p.dim() == 1]


def finetune_block(block, inputs: BlockInputs, index: int, device,
                   targets: list[torch.Tensor], config: FinetuneConfig) -> dict:
    """Tune the block in place; returns its relative output errors "before" and "after"
    on the check batches (every CHECK_EVERY-th), and the block's "outputs" for every batch.
    When tuning made the error worse (it minimises the error before rounding to the
    stored dtypes), everything is put back."""
    layers = tunable_layers(block)
    if not layers:
        before, outputs = relative_error(block, inputs, index, device, targets)
        return {"before": before, "after": before, "outputs": outputs}
    checked = range(0, len(inputs.hidden), CHECK_EVERY)
    before, _ = relative_error(block, inputs.subset(checked), index, device,
                               [targets[b] for b in checked])
    norms = norm_parameters(block)
    formats = {name: layer.quantized_weight() for name, layer in layers.items()}
    saved_norms = [p.detach().clone() for p in norms]
    tuned = _adam(block, layers, norms, formats, inputs, index, device, targets, config)
    for name, layer in layers.items():
        _install(layer, tuned[name])
    _, outputs = relative_error(block, inputs, index, device, targets)
    after = output_error([outputs[b] for b in checked], [targets[b] for b in checked])
    if after > before:
        for name, layer in layers.items():
            _install(layer, formats[name])
        with torch.no_grad():
            for p, old in zip(norms, saved_norms):
                p.copy_(old)
        _, outputs = relative_error(block, inputs, index, device, targets)
        after = before
    return {"before": before, "after": after, "outputs": outputs}


def _adam(block, layers, norms, formats, inputs, index, device, targets, config) -> dict:
    """The formats (rounded to storage) after `config.steps` Adam steps; the norms are
    tuned in place."""
    on_device = {name: fmt.to(device) for name, fmt in formats.items()}
    parts = {name: {k: v.to(device).requires_grad_() for k, v in fmt.tunable().items()}
             for name, fmt in formats.items()}
    params = [t for p in parts.values() for t in p.values()] + norms
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.95))
    for p in norms:
        p.requires_grad_(True)
    steps = [(b, slice(start, start + config.sequences))
             for b, hidden in enumerate(inputs.hidden)
             for start in range(0, hidden.shape[0], config.sequences)]
    try:
        for step in range(config.steps):
            b, rows = steps[step % len(steps)]
            for name, layer in layers.items():
                layer.pin_dense(on_device[name].dequantize_tunable(parts[name]))
            out = run_block(block, *inputs.rows(index, b, rows), device)
            err, norm = _squared(out, targets[b][rows])
            loss = err / norm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p in norms:
            p.requires_grad_(False)
    return {name: formats[name].with_tunable({k: v.detach() for k, v in parts[name].items()})
            for name in layers}


def _install(layer: QuantLinear, fmt) -> None:
    """Point the layer's stored tensors at `fmt`'s and pin its dequantized weight."""
    for name, tensor in fmt.state_dict().items():
        getattr(layer, name).data = tensor.to(getattr(layer, name).device)
    layer.pin_dense(fmt.dequantize(torch.float32))
