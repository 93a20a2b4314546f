"""`CodebookWeight`: additive-codebook weights (AQLM), in the `aqlm` package's layout.

Each row's input is cut into groups of `in_group_size` weights; a group is the sum of one
vector from each of `num_codebooks` codebooks, times the row's scale:

    W[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m], 0, :]

On disk: `codes` [out, in/g, M] int8 (B <= 8) or int16 (B <= 16), stored signed and read
as `& (2^B - 1)`; `codebooks` fp16 [M, 2^B, 1, g]; `scales` fp16 [out, 1, 1, 1].
"""

from __future__ import annotations

import functools
import warnings

import torch

from quant.errors import ConfigError
from quant.formats.base import TensorSpec, check_state_dict, register_format, stored_bits

MAX_CODEBOOK_BITS = 16


def code_dtype(nbits: int) -> torch.dtype:
    return torch.int8 if nbits <= 8 else torch.int16


def check_codebook_config(num_codebooks: int, nbits: int, in_group_size: int,
                          in_features: int | None = None) -> None:
    """Raise ConfigError for codebook shapes CodebookWeight cannot store."""
    if not 1 <= nbits <= MAX_CODEBOOK_BITS:
        raise ConfigError(f"codebooks of {nbits} bits are not supported (1 to 16)")
    if num_codebooks < 1 or in_group_size < 1:
        raise ConfigError("the number of codebooks and the in-group size must be positive")
    if in_features is not None and in_features % in_group_size:
        raise ConfigError(f"--in-group {in_group_size} does not divide the input dimension "
                          f"{in_features}; choose a divisor of it")


def codebook_config(num_codebooks: int, nbits: int, in_group_size: int) -> dict:
    """The module config of a codebook layer (out_group_size is always 1 here)."""
    return {"format": "codebook", "num_codebooks": num_codebooks, "nbits_per_codebook": nbits,
            "in_group_size": in_group_size, "out_group_size": 1}


def reconstruct(codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor,
                uses: list[torch.Tensor] | None = None) -> torch.Tensor:
    """W [out, in] from codes [out, J, M] (int64, in [0, 2^B)), books [M, 2^B, g], scales [out].
    `uses`, each codebook's `codeword_uses` of these codes, makes the gradient into the
    books one sparse product each (worth building when the codes stay fixed)."""
    out, groups, m = codes.shape
    vectors = sum(LookUp.apply(books[i], codes[:, :, i], None if uses is None else uses[i])
                  for i in range(m))
    return (vectors * scales[:, None, None]).reshape(out, groups * books.shape[2])


def codeword_uses(index: torch.Tensor, k: int, dtype=torch.float32) -> torch.Tensor:
    """Sparse [k, n] matrix with a one at (index[i], i): times rows [n, g], the sum of
    each codeword's rows: on the CPU far faster than index_add_ into the k rows
    (benchmarks/cpu-design-notes.json)."""
    crow = torch.zeros(k + 1, dtype=torch.long, device=index.device)
    crow[1:] = torch.cumsum(torch.bincount(index, minlength=k), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, torch.argsort(index, stable=True),
                                       torch.ones(len(index), dtype=dtype, device=index.device),
                                       (k, len(index)), check_invariants=False)


class LookUp(torch.autograd.Function):
    """table[index] for a 2-D table, differentiable in the table. On CPUs, indexing and its
    autograd (index_put) are several times slower than `embedding` for the lookup and the
    index's `codeword_uses` times the gradient rows for its gradient (given when the caller
    keeps them across calls, else built here), and fine-tuning does both for every layer
    each step."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, uses=None) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows, ctx.uses = table.shape[0], uses
        return torch.nn.functional.embedding(index, table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        uses = ctx.uses if ctx.uses is not None else codeword_uses(index.reshape(-1), ctx.rows)
        dtype = torch.promote_types(uses.dtype, rows.dtype)
        with torch.autocast(rows.device.type, enabled=False):  # no sparse bf16 product
            return (uses.to(dtype) @ rows.to(dtype)).to(grad.dtype), None, None


@register_format("codebook")
class CodebookWeight:
    TUNABLE = True  # codebooks and scales, with the codes frozen (quant.finetune)

    def __init__(self, codes, codebooks, scales, *, in_features: int, out_features: int):
        self.codes, self.codebooks, self.scales = codes, codebooks, scales
        self.in_features, self.out_features = in_features, out_features
        self.num_codebooks, size, _, self.in_group_size = codebooks.shape
        self.nbits = size.bit_length() - 1

    # ---- layout ------------------------------------------------------------------------
    @staticmethod
    def tensor_specs(out_features: int, in_features: int, config: dict) -> dict[str, TensorSpec]:
        m, b, g = config["num_codebooks"], config["nbits_per_codebook"], config["in_group_size"]
        check_codebook_config(m, b, g, in_features)
        return {
            "codes": TensorSpec((out_features, in_features // g, m), code_dtype(b)),
            "codebooks": TensorSpec((m, 1 << b, 1, g), torch.float16),
            "scales": TensorSpec((out_features, 1, 1, 1), torch.float16),
        }

    @property
    def config(self) -> dict:
        return codebook_config(self.num_codebooks, self.nbits, self.in_group_size)

    @property
    def name(self) -> str:
        return self.describe(self.config)

    @staticmethod
    def describe(config: dict) -> str:
        """A layer's scheme in a few words, from its module config: "1x16 g8"."""
        return (f"{config['num_codebooks']}x{config['nbits_per_codebook']} "
                f"g{config['in_group_size']}")

    @property
    def bits_per_weight(self) -> float:
        specs = self.tensor_specs(self.out_features, self.in_features, self.config)
        return stored_bits(specs) / (self.out_features * self.in_features)

    def tuning_key(self) -> tuple[str, int]:
        """(scheme name in tuned kernel configs, reduction steps: code groups per row)."""
        return (f"{self.num_codebooks}x{self.nbits}g{self.in_group_size}",
                self.in_features // self.in_group_size)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_parts(cls, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor):
        """From codes [out, in/g, M] (any int dtype, values in [0, 2^B)), codebooks [M, 2^B, g]
        and scales [out] (rounded to fp16 here)."""
        out_features, ngroups, m = codes.shape
        size, g = codebooks.shape[1], codebooks.shape[2]
        if codebooks.shape[0] != m or size & (size - 1) or scales.shape != (out_features,):
            raise ValueError(f"codes {list(codes.shape)}, codebooks {list(codebooks.shape)} "
                             f"and scales {list(scales.shape)} do not fit together")
        nbits = size.bit_length() - 1
        check_codebook_config(m, nbits, g)
        dtype, wide = code_dtype(nbits), codes.to(torch.int32)
        # two's complement: codes above the signed range wrap, and read back with & (2^B - 1)
        signed = torch.where(wide > torch.iinfo(dtype).max, wide - (1 << (8 * dtype.itemsize)), wide)
        return cls(signed.to(dtype).contiguous(),
                   codebooks.to(torch.float16).reshape(m, size, 1, g).contiguous(),
                   scales.to(torch.float16).reshape(out_features, 1, 1, 1).contiguous(),
                   in_features=ngroups * g, out_features=out_features)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "codebooks": self.codebooks, "scales": self.scales}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict,
                        out_features: int, in_features: int, where: str = "layer"):
        check_state_dict(tensors, cls.tensor_specs(out_features, in_features, config), where)
        return cls(tensors["codes"], tensors["codebooks"], tensors["scales"],
                   in_features=in_features, out_features=out_features)

    def to(self, device) -> "CodebookWeight":
        moved = {k: v.to(device) for k, v in self.state_dict().items()}
        return CodebookWeight(**moved, in_features=self.in_features,
                              out_features=self.out_features)

    # ---- reading -----------------------------------------------------------------------
    def code_indices(self) -> torch.Tensor:
        """[out, in/g, M] int64 codes in [0, 2^B)."""
        return self.codes.long() & ((1 << self.nbits) - 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] this format represents (the torch reference)."""
        parts = self._float_parts()
        return reconstruct(self.code_indices(), parts["codebooks"], parts["scales"]).to(dtype)

    def _float_parts(self) -> dict[str, torch.Tensor]:
        """fp32 codebooks [M, 2^B, g] and scales [out]."""
        return {"codebooks": self.codebooks.float()[:, :, 0, :],
                "scales": self.scales.float().view(-1)}

    # ---- block fine-tuning (quant.finetune): codes frozen, codebooks and scales tuned --
    def tunable(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self._float_parts().items()}

    def dequantize_tunable(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        codes, uses = self._frozen_codes
        return reconstruct(codes, parts["codebooks"], parts["scales"], uses)

    @functools.cached_property
    def _frozen_codes(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The codes and their `codeword_uses`, built once: tuning calls
        dequantize_tunable every step with the codes fixed."""
        codes = self.code_indices()
        return codes, [codeword_uses(codes[:, :, i].reshape(-1), 1 << self.nbits)
                       for i in range(self.num_codebooks)]

    def with_tunable(self, parts: dict[str, torch.Tensor]) -> "CodebookWeight":
        return CodebookWeight.from_parts(self.code_indices(), parts["codebooks"],
                                         parts["scales"])
