"""AQLM (Egiazarian et al., 2024): additive quantization of each linear with M codebooks of
2^B vectors of g weights, minimising the layer's output error with H = 2/n X X^T.

Per layer: residual k-means on the row-normalised weight groups, then epochs of
(codes by coordinate descent, codebooks by least squares, scales in closed form) until the
relative improvement falls below `tol` (the math: quant/methods/codebooks.py).
`--bits` picks the codebook shape per layer (`choose_shape`) unless `--codebooks` fixes it.
The method asks the pipeline for its fine-tuning stages (quant/finetune.py): per block
(`finetune`) and, after every block, distillation of the whole model (`distill`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from quant.errors import ConfigError
from quant.formats.codebook_weight import CodebookWeight, check_codebook_config, codebook_config
from quant.methods import codebooks as cb
from quant.methods.base import (Calibration, FinetuneConfig, LayerSpec, Method, Stages,
                                register_method)
from quant.stats import output_energy, relative_output_error


@dataclass(frozen=True)
class Shape:
    num_codebooks: int
    nbits: int
    in_group: int

    def __str__(self) -> str:
        return f"{self.num_codebooks}x{self.nbits} g{self.in_group}"

    def spec(self, out_features: int, in_features: int, note: str = "") -> LayerSpec:
        """A layer of this shape, as planned (its bits are counted by the format)."""
        config = codebook_config(self.num_codebooks, self.nbits, self.in_group)
        return LayerSpec(out_features, in_features, config, note)

    @classmethod
    def of(cls, spec: LayerSpec) -> "Shape":
        c = spec.config
        return cls(c["num_codebooks"], c["nbits_per_codebook"], c["in_group_size"])

    def groups(self, out_features: int, in_features: int) -> int:
        """Weight groups (codes per codebook) of a layer."""
        return out_features * in_features // self.in_group

    def fits(self, out_features: int, in_features: int) -> bool:
        """The in-group divides the layer and a codebook is no larger than its groups."""
        return (in_features % self.in_group == 0
                and self.groups(out_features, in_features) >= (1 << self.nbits))


def candidate_shapes(bits: int) -> list[Shape]:
    """Codebook shapes storing exactly `bits` code bits per weight, best first: 16-bit
    codebooks (1x16 g8 is the paper's 2-bit) over in-groups near 8, then 8-bit ones,
    fewest codebooks first: at equal code bits one 8-bit codebook over a smaller in-group
    has less output error than several over a larger one (README, aqlm), in no more time
    and with a fraction of the codebook storage."""
    shapes = [Shape(m, b, m * b // bits) for b in (16, 8) for m in range(1, 9)
              if (m * b) % bits == 0 and m * b // bits in (2, 4, 8, 16)]
    return sorted(shapes, key=lambda s: (
        -s.nbits, abs(s.in_group - 8) if s.nbits == 16 else s.num_codebooks))


def wider_shape(shape: Shape, out_features: int, in_features: int) -> Shape | None:
    """The same codebooks over the next smaller in-group that divides the layer, when that
    stores at most half again the code bits (1x8 g4 -> 1x8 g3: 2.67 bits), else None."""
    for in_group in range(shape.in_group - 1, 0, -1):
        if in_features % in_group == 0:
            wide = Shape(shape.num_codebooks, shape.nbits, in_group)
            wide_enough = 3 * in_group >= 2 * shape.in_group
            return wide if wide_enough and wide.fits(out_features, in_features) else None
    return None


def parse_codebooks(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise ConfigError(f"--codebooks must look like MxB, e.g. 1x16 or 2x8 (got {text!r})")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class AQLMConfig:
    bits: int = field(default=2, metadata={
        "help": "aqlm: code bits per weight, 1 to 8 (default 2), from which each "
                "layer's --codebooks/--in-group are chosen"})
    codebooks: str | None = field(default=None, metadata={
        "help": "aqlm: MxB, M codebooks of 2^B vectors (1x16, 2x8, 1x8...); default: "
                "chosen per layer from --bits"})
    in_group: int | None = field(default=None, metadata={
        "help": "aqlm: weights per code group (default: --codebooks M*B / --bits)"})
    wide_layers: str = field(default="up_proj|o_proj", metadata={
        "help": "aqlm: layers (a regex searched in their names) that --bits gives up to half "
                "again the code bits, by the next smaller in-group (1x8 g3 for 1x8 g4); "
                "default: the MLP's up and attention's output projections; '' for none"})
    codebook_budget: float = field(default=0.25, metadata={
        "help": "aqlm: when choosing shapes, the largest codebook storage allowed as a "
                "fraction of the layer's code storage"})
    max_epochs: int = field(default=8, metadata={
        "help": "aqlm: most (codes, codebooks, scales) rounds per layer"})
    tol: float = field(default=1e-2, metadata={
        "help": "aqlm: stop a layer when an epoch improves its error by less than this "
                "fraction"})
    beam: int = field(default=1, metadata={
        "help": "aqlm: codes of two codebooks are searched together, each of the beam best "
                "codewords of one with every codeword of the other; 1: one codebook at a "
                "time"})
    kmeans_iters: int = field(default=10, metadata={"help": "aqlm: k-means iterations at init"})
    cg_iters: int = field(default=5, metadata={
        "help": "aqlm: conjugate-gradient iterations per codebook solve"})
    init_seed: int = field(default=0, metadata={
        "help": "aqlm: seed of the k-means initialisation"})
    finetune_steps: int = field(default=0, metadata={
        "help": "aqlm: Adam steps per block tuning codebooks, scales and norms to the fp "
                "block's outputs (codes frozen), two calibration sequences each; 0: off "
                "(the default: --distill-steps gains more per second)"})
    finetune_lr: float = field(default=3e-3, metadata={
        "help": f"aqlm: peak learning rate of the block fine-tuning "
                f"({FinetuneConfig.SCHEDULE})"})
    distill_steps: int = field(default=70, metadata={
        "help": "aqlm: Adam steps after every block is quantized, tuning all codebooks, "
                "scales and norms so that the model's next-token distributions match the fp "
                "model's (KL divergence), two calibration sequences each; 0: off"})
    distill_lr: float = field(default=2e-3, metadata={
        "help": f"aqlm: peak learning rate of the model distillation "
                f"({FinetuneConfig.SCHEDULE})"})

    def given_shape(self) -> Shape | None:
        """The shape --codebooks (and --in-group) fix, or None when --bits chooses."""
        if self.codebooks is None:
            return None
        m, b = parse_codebooks(self.codebooks)
        if not self.in_group and (m * b) % self.bits:
            raise ConfigError(f"--codebooks {self.codebooks} cannot store {self.bits} bits "
                              "per weight; give --in-group or another --bits")
        shape = Shape(m, b, self.in_group or m * b // self.bits)
        check_codebook_config(m, b, shape.in_group)
        return shape

    def validate(self) -> "AQLMConfig":
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"--bits {self.bits} is not reachable by a codebook shape "
                              "(aqlm supports 1 to 8 code bits per weight)")
        if self.given_shape() is None and self.in_group is not None:
            raise ConfigError("--in-group needs --codebooks (or drop it and let --bits choose)")
        try:
            re.compile(self.wide_layers)
        except re.error as exc:
            raise ConfigError(f"--wide-layers {self.wide_layers!r} is not a regex: {exc}") from None
        if self.codebook_budget <= 0:
            raise ConfigError("--codebook-budget must be positive")
        if min(self.max_epochs, self.kmeans_iters, self.cg_iters, self.beam) < 1:
            raise ConfigError("--max-epochs, --beam, --kmeans-iters and --cg-iters must be "
                              "positive")
        if min(self.finetune_steps, self.distill_steps) < 0 or \
                min(self.finetune_lr, self.distill_lr) <= 0:
            raise ConfigError("--finetune-steps and --distill-steps must be >= 0, "
                              "--finetune-lr and --distill-lr positive")
        if not 0 <= self.tol < 1:
            raise ConfigError(f"--tol must be in [0, 1) (got {self.tol})")
        return self


@register_method("aqlm")
class AQLM(Method):
    Config = AQLMConfig

    @property
    def calibration(self) -> Calibration:
        # its 2-bit error is far above bf16 matmul rounding
        return Calibration(nsamples=128, hessian=True, bf16_matmuls=True)

    @property
    def stages(self) -> Stages:
        c = self.config
        return Stages(finetune=FinetuneConfig.requested(c.finetune_steps, c.finetune_lr),
                      distill=FinetuneConfig.requested(c.distill_steps, c.distill_lr))

    def label(self) -> str:
        return f"aqlm-{self.config.bits}bit"

    def plan_layer(self, name: str, out_features: int, in_features: int) -> LayerSpec:
        shape, why = self.choose_shape(out_features, in_features, name)
        return shape.spec(out_features, in_features, why)

    def choose_shape(self, out_features: int, in_features: int,
                     name: str = "") -> tuple[Shape, str]:
        """(shape, why) for the layer `name`; raises ConfigError when none fits."""
        c = self.config
        shape = c.given_shape()
        if shape is not None:
            check_codebook_config(shape.num_codebooks, shape.nbits, shape.in_group, in_features)
            if not shape.fits(out_features, in_features):
                raise ConfigError(
                    f"--codebooks {c.codebooks}: a {1 << shape.nbits}-vector codebook is larger "
                    f"than the {shape.groups(out_features, in_features)} weight groups of a "
                    f"{out_features}x{in_features} layer; use a smaller codebook (e.g. 2x8) or "
                    "let --bits choose")
            return shape, "given"
        shape, why = self._shape_for_bits(out_features, in_features)
        if c.wide_layers and re.search(c.wide_layers, name):
            wide = wider_shape(shape, out_features, in_features)
            if wide is None:
                return shape, why + ("; --wide-layers: no in-group within half again the "
                                     "code bits divides the layer")
            return wide, f"{shape} widened (--wide-layers)"
        return shape, why

    def _shape_for_bits(self, out_features: int, in_features: int) -> tuple[Shape, str]:
        c = self.config
        fitting = [s for s in candidate_shapes(c.bits) if s.fits(out_features, in_features)]
        if not fitting:
            raise ConfigError(f"--bits {c.bits} is not reachable by any codebook shape for a "
                              f"{out_features}x{in_features} layer")

        def storage(s: Shape, tensor: str) -> int:
            return s.spec(out_features, in_features).stored_bits([tensor])

        for shape in fitting:
            if storage(shape, "codebooks") <= c.codebook_budget * storage(shape, "codes"):
                return shape, "within budget"
        smallest = min(fitting, key=lambda s: storage(s, "codebooks"))
        return smallest, "smallest codebook (none within --codebook-budget)"

    def quantize(self, weight: torch.Tensor, stats: torch.Tensor, spec: LayerSpec):
        result = quantize_layer(weight.float(), stats.float(), Shape.of(spec), self.config)
        fmt = CodebookWeight.from_parts(result["codes"], result["books"], result["scales"])
        return fmt, {"shape_choice": spec.note, "epochs": result["epochs"],
                     "aqlm_rel_loss": result["rel_loss"]}


def quantize_layer(W: torch.Tensor, H: torch.Tensor, shape: Shape, config: AQLMConfig) -> dict:
    """codes [out, J, M], books [M, K, g], scales [out] (fp16-representable) for W, H."""
    out_features, in_features = W.shape
    g = shape.in_group
    generator = torch.Generator().manual_seed(config.init_seed)
    norms = W.pow(2).mean(1).sqrt().clamp_min(cb.TINY_SCALE)
    codes, books = cb.residual_kmeans((W / norms[:, None]).reshape(-1, g), shape.num_codebooks,
                                      shape.nbits, config.kmeans_iters, generator)
    codes = codes.view(out_features, in_features // g, shape.num_codebooks)
    scales = cb.solve_scales(W, H, codes, books)
    energy = output_energy(W, H)

    def error(codes, books, scales) -> float:
        return relative_output_error(W, cb.reconstruct(codes, books, scales), H, energy)

    loss, epochs = error(codes, books, scales), 0
    for epochs in range(1, config.max_epochs + 1):
        codes = cb.update_codes(W, H, codes, books, scales, beam=config.beam)
        books = cb.solve_codebooks(W, H, codes, books, scales, iters=config.cg_iters)
        books = books.half().float()  # what is stored; the scales then absorb the rounding
        scales = cb.solve_scales(W, H, codes, books).half().float()
        new = error(codes, books, scales)
        improved, loss = loss - new, new
        if improved < config.tol * loss:
            break
    return {"codes": codes, "books": books, "scales": scales, "epochs": epochs,
            "rel_loss": loss}
