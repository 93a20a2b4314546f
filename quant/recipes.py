"""Data under recipes/ (DESIGN.md §7), loaded and validated into dataclasses: complete
quantization jobs (`recipes/<name>.toml`), known model configs (`recipes/models/*.toml`: a
model's published config.json, so it can be planned offline) and GPUs (`recipes/gpus.toml`). A file with an unknown key, a missing one or a
value of the wrong type is refused with one line naming the file and the key."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from quant.errors import ConfigError

ROOT = Path(__file__).resolve().parent / "recipe_files"  # -> ../recipes


@dataclass(frozen=True)
class KnownModel:
    name: str
    hub_id: str
    aliases: tuple[str, ...]
    source: str
    config: dict          # the published config.json
    null: tuple[str, ...] = ()  # config fields that are null in the published file

    def names(self) -> list[str]:
        return [self.name, self.hub_id, *self.aliases]

    def transformers_config(self):
        from transformers import AutoConfig

        config = {k: v for k, v in self.config.items() if k != "model_type"}
        config.update({field: None for field in self.null})
        return AutoConfig.for_model(self.config["model_type"], **config)


@dataclass(frozen=True)
class GPU:
    name: str
    aliases: tuple[str, ...]
    memory_gib: float     # as marketed (NVIDIA's "GB" are GiB-sized)
    bandwidth_gbs: float  # peak memory bandwidth, GB/s
    family: str
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def names(self) -> list[str]:
        return [self.name, *self.aliases]


def _build(cls, data: dict, where: str):
    """`cls` from a TOML table, checking keys and value types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    values = {}
    for name, value in data.items():
        kind = {"tuple[str, ...]": list, "dict": dict, "float": (int, float), "str": str}[
            str(fields[name].type)]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{where}: {name} = {value!r} is not a {fields[name].type}")
        values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML file ({exc})") from None


@functools.cache
def known_models() -> dict[str, KnownModel]:
    models = {}
    for path in sorted((ROOT / "models").glob("*.toml")):
        model = _build(KnownModel, _read(path), str(path))
        if "model_type" not in model.config:
            raise ConfigError(f"{path}: [config] has no model_type")
        models[model.name] = model
    return models


@functools.cache
def memory_constants() -> dict:
    """recipes/memory.toml: the fits calculator's measured coefficients and defaults."""
    return _read(ROOT / "memory.toml")


@functools.cache
def gpus() -> dict[str, GPU]:
    path = ROOT / "gpus.toml"
    return {gpu.name: gpu for gpu in (_build(GPU, entry, f"{path} [[gpu]] {i}")
                                      for i, entry in enumerate(_read(path).get("gpu", [])))}


# ---- job recipes ------------------------------------------------------------------------

DATA_FILES = ("gpus", "memory")  # recipes/*.toml that are not jobs
CALIBRATION_KEYS = {"dataset": "calib", "nsamples": "nsamples", "seqlen": "seqlen",
                    "seed": "seed"}  # [calibration] key -> quantize's option
EVAL_KEYS = {"ppl": "eval_ppl"}


@dataclass(frozen=True)
class JobRecipe:
    """A complete `quantize` job: the model, the method and its options, calibration and
    evaluation, as `quantize --recipe NAME` runs it."""

    name: str
    path: str
    description: str
    method: str
    model: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    calibration: dict = dataclasses.field(default_factory=dict)
    eval: dict = dataclasses.field(default_factory=dict)

    def settings(self) -> dict:
        """The recipe as values of quantize's options (argparse names)."""
        values = {"model": self.model, "method": self.method}
        values.update({CALIBRATION_KEYS[k]: v for k, v in self.calibration.items()})
        values.update({EVAL_KEYS[k]: v for k, v in self.eval.items()})
        return {k: v for k, v in values.items() if v is not None}


def _job_recipe(path: Path) -> JobRecipe:
    from quant.data import CalibConfig, check_eval_name
    from quant.eval.evaluate import expand_datasets
    from quant.methods import METHODS, make_method

    data, where = _read(path), str(path)
    tables = {"options": None, "calibration": CALIBRATION_KEYS, "eval": EVAL_KEYS}
    for key, value in data.items():
        if key not in ("description", "method", "model", *tables):
            raise ConfigError(f"{where}: unknown key {key!r} (known: description, method, "
                              f"model, {', '.join(tables)})")
        if key in tables and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table ([{key}])")
        if key not in tables and not isinstance(value, str):
            raise ConfigError(f"{where}: {key} = {value!r} is not a string")
    for name in ("description", "method"):
        if name not in data:
            raise ConfigError(f"{where}: missing key {name!r}")
    if data["method"] not in METHODS:
        raise ConfigError(f"{where}: unknown method {data['method']!r} (known: "
                          f"{', '.join(sorted(METHODS))})")
    known = {"options": [f.name for f in dataclasses.fields(METHODS[data["method"]].Config)],
             "calibration": list(CALIBRATION_KEYS), "eval": list(EVAL_KEYS)}
    for table, names in known.items():
        unknown = sorted(set(data.get(table, {})) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} in [{table}] (known: "
                              f"{', '.join(names)})")
    recipe = JobRecipe(name=path.stem, path=where, **data)
    try:
        make_method(recipe.method, **recipe.options)
        CalibConfig(**recipe.calibration).validate()
        for dataset in expand_datasets(recipe.eval.get("ppl", "all-demo")):
            check_eval_name(dataset)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return recipe


@functools.cache
def job_recipes() -> dict[str, JobRecipe]:
    return {path.stem: _job_recipe(path) for path in sorted(ROOT.glob("*.toml"))
            if path.stem not in DATA_FILES}


def find_recipe(name: str) -> JobRecipe:
    """A shipped recipe by name, or a recipe file by path."""
    if name.endswith(".toml") and Path(name).is_file():
        return _job_recipe(Path(name))
    recipes = job_recipes()
    if name not in recipes:
        close = difflib.get_close_matches(name, recipes, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown recipe {name!r}; {hint}known: {', '.join(recipes)} (or a "
                          "path to a .toml file)")
    return recipes[name]


def _key(name: str) -> str:
    """Names compare without case, spaces or punctuation ("RTX 4090" is "rtx-4090")."""
    return re.sub(r"[^a-z0-9.]", "", name.lower())


def _find(table: dict, name: str):
    wanted = _key(name)
    for item in table.values():
        if wanted in (_key(n) for n in item.names()):
            return item
    return None


def suggestions(table: dict, name: str) -> str:
    """'; did you mean ...?' with the closest known names, or the list of names."""
    names = [n for item in table.values() for n in item.names()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f" (known: {', '.join(table)})"


def find_model(name: str) -> KnownModel | None:
    """The known model called `name` (its name, hub id or an alias), or None."""
    return _find(known_models(), name)


def find_gpu(name: str) -> GPU:
    gpu = _find(gpus(), name)
    if gpu is None:
        raise ConfigError(f"unknown GPU {name!r}{suggestions(gpus(), name)}")
    return gpu
