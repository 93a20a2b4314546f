"""Fine-tuning stages of the pipeline: with the discrete parts (codes) frozen, Adam tunes
the continuous parts of each quantized layer's format (AQLM codebooks and scales) and the
norms.

- Block fine-tuning, after a block's linears are quantized: the block reproduces the fp
  block's outputs on the calibration batches.
- Model fine-tuning (distillation), after every block: the quantized model's next-token
  distribution matches the fp model's (KL divergence) on the calibration sequences, which
  also corrects the error each block passes on to the next.

A format takes part when it has `tunable()` (fp32 copies of its continuous tensors),
`dequantize_tunable(parts)` (the dense weight, differentiable in the parts) and
`with_tunable(parts)` (a new format with the parts rounded to their stored dtypes): its
class sets `TUNABLE = True`.
"""

from __future__ import annotations

import contextlib

import torch

from quant.layers import QuantLinear
from quant.methods.base import FinetuneConfig
from quant.traverse import BlockRun

CHECK_EVERY = 4  # the error before and after tuning is compared on every 4th batch


def block_outputs(run: BlockRun) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch, on the CPU (the fp targets)."""
    with torch.no_grad():
        return [out.to("cpu") for out in run.batches()]


def relative_error(run: BlockRun, targets: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """(sum ||block(x) - target||^2 / sum ||target||^2 over every calibration batch, the
    block's outputs)."""
    with torch.no_grad():
        outputs = list(run.batches())
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
            if isinstance(m, QuantLinear) and m.format_cls.TUNABLE}


def norm_parameters(block) -> list[torch.nn.Parameter]:
    """The block's 1-D float parameters outside its quantized layers: the norms' weights
    (and biases)."""
    quantized = {id(p) for m in block.modules() if isinstance(m, QuantLinear)
                 for p in m.parameters()}
    return [p for p in block.parameters()
            if id(p) not in quantized and p.is_floating_point() and p.dim() == 1]


def finetune_block(run: BlockRun, targets: list[torch.Tensor], config: FinetuneConfig) -> dict:
    """Tune the block in place; returns its relative output errors "before" and "after"
    on the check batches (every CHECK_EVERY-th), and the block's "outputs" for every batch.
    When tuning made the error worse (it minimises the error before rounding to the
    stored dtypes), everything is put back."""
    tunables = Tunables(run.block, run.device)
    if not tunables.layers:
        before, outputs = relative_error(run, targets)
        return {"before": before, "after": before, "outputs": outputs}
    checked = range(0, len(run.inputs.hidden), CHECK_EVERY)
    before, _ = relative_error(run.subset(checked), [targets[b] for b in checked])
    steps = [(b, slice(start, start + config.sequences))
             for b, hidden in enumerate(run.inputs.hidden)
             for start in range(0, hidden.shape[0], config.sequences)]

    def loss(step: int) -> torch.Tensor:
        b, rows = steps[step % len(steps)]
        err, norm = _squared(run.forward(*run.rows(b, rows)), targets[b][rows])
        return err / norm

    tunables.adam(loss, config)
    _, outputs = relative_error(run, targets)
    after = output_error([outputs[b] for b in checked], [targets[b] for b in checked])
    if after > before:
        tunables.restore()
        _, outputs = relative_error(run, targets)
        after = before
    return {"before": before, "after": after, "outputs": outputs}


class Tunables:
    """The continuous parts of the tunable QuantLinears of `root` (a block or the model)
    and its norms, which Adam tunes; the layers keep their formats (and the norms their
    values) until `adam` installs new ones."""

    def __init__(self, root: torch.nn.Module, device):
        self.root, self.layers, self.norms = root, tunable_layers(root), norm_parameters(root)
        self.formats = {name: layer.quantized_weight() for name, layer in self.layers.items()}
        self.saved_norms = [p.detach().clone() for p in self.norms]
        self.on_device = {name: fmt.to(device) for name, fmt in self.formats.items()}
        self.parts = {name: {k: v.to(device).requires_grad_() for k, v in fmt.tunable().items()}
                      for name, fmt in self.formats.items()}

    def pin(self) -> None:
        """Make the layers compute with the dense weights of the current parts."""
        for name, layer in self.layers.items():
            layer.pin_dense(self.on_device[name].dequantize_tunable(self.parts[name]))

    def adam(self, loss, config: FinetuneConfig, progress=None) -> None:
        """`config.steps` Adam steps on `loss(step)`, then the tuned formats (rounded to
        storage) are installed; the norms are tuned in place. `progress` wraps the steps
        (a tqdm bar)."""
        params = [t for p in self.parts.values() for t in p.values()] + self.norms
        optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.95))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
        with grads_only_for(self.root, self.norms):
            for step in (progress or iter)(range(config.steps)):
                self.pin()
                value = loss(step)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                schedule.step()
        for name, layer in self.layers.items():
            parts = {k: v.detach() for k, v in self.parts[name].items()}
            _install(layer, self.formats[name].with_tunable(parts))

    def restore(self) -> None:
        """Put the original formats and norms back."""
        for name, layer in self.layers.items():
            _install(layer, self.formats[name])
        with torch.no_grad():
            for p, old in zip(self.norms, self.saved_norms):
                p.copy_(old)


@contextlib.contextmanager
def grads_only_for(root: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Inside, of `root`'s parameters only `params` require grad: backward then skips the
    weight gradients nothing tunes (for a model, the tied embedding's [vocab, hidden]
    product every step)."""
    flags = {p: p.requires_grad for p in root.parameters()}
    tuned = {id(p) for p in params}
    try:
        for p in flags:
            p.requires_grad_(id(p) in tuned)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _install(layer: QuantLinear, fmt) -> None:
    """Point the layer's stored tensors at `fmt`'s and pin its dequantized weight."""
    for name, tensor in fmt.state_dict().items():
        getattr(layer, name).data = tensor.to(getattr(layer, name).device)
    layer.pin_dense(fmt.dequantize(torch.float32))


# ---- the whole model ---------------------------------------------------------------------

CHECK_SEQUENCES = 4  # held out of model fine-tuning to measure it (when there are enough)


def finetune_model(model, teacher, input_ids: torch.Tensor, config: FinetuneConfig, device,
                   seed: int = 0, progress=None) -> dict | None:
    """Distil `teacher` (the fp model) into the quantized `model` in place: Adam steps on
    the KL divergence of their next-token distributions over `config.sequences`
    calibration sequences each. Returns the mean KL per token on held-out check sequences
    "before" and "after" (the model is put back when it got worse), or None when the
    model has nothing to tune."""
    tunables = Tunables(model, device)
    if not tunables.layers:
        return None
    train, check = split_sequences(len(input_ids), seed)
    before = distillation_loss(model, teacher, input_ids[check], device)

    def loss(step: int) -> torch.Tensor:
        start = step * config.sequences
        rows = train[[(start + j) % len(train) for j in range(config.sequences)]]
        return _kl(model, teacher, input_ids[rows].to(device))

    tunables.adam(loss, config, progress)
    after = distillation_loss(model, teacher, input_ids[check], device)
    if after > before:
        tunables.restore()
        after = before
    for layer in tunables.layers.values():
        layer.pin_dense(None)
    return {"kl_before": before, "kl_after": after}


def split_sequences(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, check) sequence numbers of model fine-tuning: a seeded shuffle whose
    last CHECK_SEQUENCES are held out, unless there are too few to spare them."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    if count > 2 * CHECK_SEQUENCES:
        return order[:-CHECK_SEQUENCES], order[-CHECK_SEQUENCES:]
    return order, order[:CHECK_SEQUENCES]


def distillation_loss(model, teacher, input_ids: torch.Tensor, device) -> float:
    """Mean KL(teacher || model) per token over the sequences, one at a time."""
    with torch.no_grad():
        return sum(float(_kl(model, teacher, ids[None].to(device))) for ids in input_ids) / \
            len(input_ids)


def _kl(model, teacher, ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions, mean per token (fp32)."""
    with torch.no_grad():
        teacher_logits = teacher(ids, use_cache=False).logits.flatten(0, 1)
    logits = model(ids, use_cache=False).logits.flatten(0, 1)
    return TeacherKL.apply(logits, teacher_logits)


KL_CHUNK_ENTRIES = 1 << 19  # logits per chunk of TeacherKL on the CPU: 2 MiB of fp32 in cache
KL_CHUNK_ENTRIES_GPU = 1 << 26  # elsewhere: bounds its fp32 temporaries to 256 MiB each


class TeacherKL(torch.autograd.Function):
    """mean over rows of KL(softmax(teacher) || softmax(student)) for logits [tokens, vocab],
    in fp32 whatever the logits' dtype. The gradient, (softmax(student) - softmax(teacher))
    / tokens, is formed in the same pass over the logits: chunk by chunk on the CPU, instead
    of autograd's several full-size fp32 copies, each of fresh pages to fault in (timings:
    benchmarks/cpu-design-notes.json)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        tokens, vocab = student.shape
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        entries = KL_CHUNK_ENTRIES if student.device.type == "cpu" else KL_CHUNK_ENTRIES_GPU
        step = max(1, entries // vocab)
        for start in range(0, tokens, step):
            rows = slice(start, start + step)
            log_q = torch.log_softmax(student[rows].float(), -1)
            log_p = torch.log_softmax(teacher[rows].float(), -1)
            p = log_p.exp()
            total += log_p.sub_(log_q).mul_(p).sum()
            if grad is not None:
                grad[rows] = log_q.exp_().sub_(p).div_(tokens)
        ctx.save_for_backward(grad)
        return (total / tokens).float()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None
