"""`IntWeight`: b-bit integer weights with per-group scales and zero points (GPTQ layout).

On disk (DESIGN.md): `qweight` int32 [ceil(in*b/32), out] packed along the input dim,
`qzeros` int32 [ngroups, ceil(out*b/32)] holding the true zero point, `scales` fp16
[ngroups, out], and with act-order `g_idx` int32 [in] (the group of each input column).
A weight is  W[o, i] = (q[i, o] - zero[g(i), o]) * scale[g(i), o].
"""

from __future__ import annotations

import torch

from quant.errors import ConfigError
from quant.formats.base import TensorSpec, check_state_dict, register_format, stored_bits
from quant.formats.packing import pack, packed_length, unpack

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
PACKING = "int32-le-bitstream"


def check_int_config(bits: int, group_size: int, in_features: int | None = None) -> None:
    """Raise ConfigError for bit widths or group sizes IntWeight cannot store."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"--bits {bits} is not supported for integer formats "
                          f"(choose from {', '.join(map(str, SUPPORTED_BITS))})")
    if group_size != -1 and group_size < 1:
        raise ConfigError(f"--group-size must be positive or -1 for one group per output "
                          f"channel (got {group_size})")
    if in_features is not None and group_size != -1:
        if group_size > in_features:
            raise ConfigError(f"--group-size {group_size} is larger than the input dimension "
                              f"{in_features}; use -1 for one group per output channel")
        if in_features % group_size:
            raise ConfigError(f"--group-size {group_size} does not divide the input dimension "
                              f"{in_features}; choose a divisor of it or -1")


def int_config(bits: int, group_size: int, sym: bool, act_order: bool) -> dict:
    """The module config of an integer layer (act_order: it stores g_idx)."""
    return {"format": "int", "bits": bits, "group_size": group_size, "sym": sym,
            "act_order": act_order}


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


@register_format("int")
class IntWeight:
    TUNABLE = False  # no continuous parts the fine-tuning stages tune (quant.finetune)

    def __init__(self, qweight, qzeros, scales, g_idx, *, bits: int, group_size: int,
                 sym: bool, in_features: int, out_features: int):
        self.qweight, self.qzeros, self.scales, self.g_idx = qweight, qzeros, scales, g_idx
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.in_features, self.out_features = in_features, out_features

    # ---- layout ------------------------------------------------------------------------
    @staticmethod
    def tensor_specs(out_features: int, in_features: int, config: dict) -> dict[str, TensorSpec]:
        bits, group_size = config["bits"], config["group_size"]
        check_int_config(bits, group_size, in_features)
        ngroups = num_groups(in_features, group_size)
        specs = {
            "qweight": TensorSpec((packed_length(in_features, bits), out_features), torch.int32),
            "qzeros": TensorSpec((ngroups, packed_length(out_features, bits)), torch.int32),
            "scales": TensorSpec((ngroups, out_features), torch.float16),
        }
        if config.get("act_order"):
            specs["g_idx"] = TensorSpec((in_features,), torch.int32)
        return specs

    @property
    def config(self) -> dict:
        return int_config(self.bits, self.group_size, self.sym, self.g_idx is not None)

    @property
    def name(self) -> str:
        return self.describe(self.config)

    @staticmethod
    def describe(config: dict) -> str:
        """A layer's scheme in a few words, from its module config: "int4 g128 act-order"."""
        group = "channel" if config["group_size"] == -1 else f"g{config['group_size']}"
        return " ".join([f"int{config['bits']}", group] + ["sym"] * bool(config.get("sym"))
                        + ["act-order"] * bool(config.get("act_order")))

    @property
    def bits_per_weight(self) -> float:
        specs = self.tensor_specs(self.out_features, self.in_features, self.config)
        return stored_bits(specs) / (self.out_features * self.in_features)

    def tuning_key(self) -> tuple[str, int]:
        """(scheme name in tuned kernel configs, reduction steps: input columns)."""
        return f"int{self.bits}", self.in_features

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_ints(cls, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, *,
                  bits: int, group_size: int, sym: bool, g_idx: torch.Tensor | None = None):
        """From unpacked integers: q [out, in], zeros [ngroups, out], scales [ngroups, out]."""
        out_features, in_features = q.shape
        check_int_config(bits, group_size, in_features)
        if zeros.shape != scales.shape or tuple(zeros.shape) != (
                num_groups(in_features, group_size), out_features):
            raise ValueError(f"zeros {list(zeros.shape)} and scales {list(scales.shape)} must "
                             f"be [{num_groups(in_features, group_size)}, {out_features}]")
        return cls(
            pack(q, bits).t().contiguous(),
            pack(zeros, bits),
            scales.to(torch.float16).contiguous(),
            None if g_idx is None else g_idx.to(torch.int32).contiguous(),
            bits=bits, group_size=group_size, sym=sym,
            in_features=in_features, out_features=out_features)

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        if self.g_idx is not None:
            tensors["g_idx"] = self.g_idx
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict,
                        out_features: int, in_features: int, where: str = "layer"):
        specs = cls.tensor_specs(out_features, in_features, config)
        check_state_dict(tensors, specs, where)
        return cls(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                   tensors.get("g_idx") if config.get("act_order") else None,
                   bits=config["bits"], group_size=config["group_size"], sym=config["sym"],
                   in_features=in_features, out_features=out_features)

    def to(self, device) -> "IntWeight":
        moved = {k: v.to(device) for k, v in self.state_dict().items()}
        return IntWeight(moved["qweight"], moved["qzeros"], moved["scales"], moved.get("g_idx"),
                         bits=self.bits, group_size=self.group_size, sym=self.sym,
                         in_features=self.in_features, out_features=self.out_features)

    # ---- reading -----------------------------------------------------------------------
    def ints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked (q [out, in], zeros [ngroups, out]) as int32."""
        q = unpack(self.qweight.t(), self.bits, self.in_features)
        zeros = unpack(self.qzeros, self.bits, self.out_features)
        return q, zeros

    def group_index(self) -> torch.Tensor:
        """[in] group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        size = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.qweight.device) // size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] this format represents (the torch reference)."""
        q, zeros = self.ints()
        scales = self.scales.float()
        if self.g_idx is None:
            ngroups = zeros.shape[0]
            q = q.view(self.out_features, ngroups, -1)
            w = (q - zeros.t()[:, :, None]) * scales.t()[:, :, None]
            return w.reshape(self.out_features, self.in_features).to(dtype)
        g = self.group_index()
        return ((q - zeros[g].t()) * scales[g].t()).to(dtype)
