"""The method registry: a quantization method turns (weight, statistics) into a format.

Methods register by name; third-party ones through the entry-point group
`lowbit.methods` (each entry point names a method class). A method declares the
statistics it needs and never runs the model: the pipeline does. Its
`quantize(weight, stats, name=...)` gets the layer's full name (e.g.
`model.layers.3.mlp.down_proj`), which a method may use to treat layers differently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.metadata import entry_points

from quant.errors import ConfigError
from quant.registry import Registry

METHODS = Registry("method", "name")
register_method = METHODS.register


@dataclass(frozen=True)
class FinetuneConfig:
    """A method's request for one of the pipeline's fine-tuning stages (quant.finetune):
    block by block, or the whole model by distillation."""

    steps: int  # Adam steps, cycling through the calibration sequences
    lr: float  # the peak rate: held, then decayed over the last DECAY_FRACTION of the steps
    sequences: int = 2  # calibration sequences (windows) per step

    # Ending on small steps matters: with a constant rate the demo model's distilled
    # perplexity swung between 12.14 and 12.68 from one checkpoint to the next.
    DECAY_FRACTION = 0.3
    SCHEDULE = f"it falls linearly to zero over the last {DECAY_FRACTION:.0%} of the steps"

    def lr_factor(self, step: int) -> float:
        """The fraction of `lr` Adam's step `step` (0-based) uses: 1, then falling linearly
        over the last DECAY_FRACTION of the steps to 1/decay_steps."""
        decay_steps = max(1, round(self.DECAY_FRACTION * self.steps))
        return min(1.0, (self.steps - step) / decay_steps)

    @classmethod
    def requested(cls, steps: int, lr: float) -> FinetuneConfig | None:
        """The stage's config, or None when a method's options turn it off (0 steps)."""
        return cls(steps, lr) if steps else None


def _load_entry_points() -> None:
    for ep in entry_points(group="lowbit.methods"):
        if ep.name not in METHODS:
            METHODS[ep.name] = ep.load()


def get_method(name: str) -> type:
    if name not in METHODS:
        _load_entry_points()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (choose from {', '.join(sorted(METHODS))})")
    return METHODS[name]


def make_method(name: str, **options):
    """A configured method instance; unknown or invalid options raise ConfigError."""
    cls = get_method(name)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise ConfigError(f"{flags} does not apply to method {name}")
    return cls(cls.Config(**options).validate())
