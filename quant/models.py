"""Finding and loading the full-precision model a user names: a demo alias, a local
directory, or a hub id (only when the hub is reachable)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from quant import assets
from quant.errors import ModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve(spec: str | None, config_only: bool = False) -> Path:
    """Local directory holding the model `spec` names (downloading/converting if needed;
    from the hub only its config.json when `config_only`)."""
    spec = spec or assets.DEFAULT_MODEL
    if spec in assets.MODELS:
        return assets.model_dir(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is not a Hugging Face model directory (no config.json)")
        return path
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelError(f"model path {spec} does not exist")
    return _from_hub(spec, ["config.json"] if config_only else None)


def _from_hub(repo_id: str, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = patterns or ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                            "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{repo_id} is not a local directory, not a demo model "
            f"({', '.join(assets.MODELS)}), and could not be fetched from the model hub "
            f"(offline or unknown id: {reason[:160]})") from None


def check_weights(path: Path, allow_pickle: bool) -> None:
    """Refuse directories whose only weights are pickle files (they can run code on load)."""
    if any(path.glob("*.safetensors")):
        return
    pickles = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
    if pickles and not allow_pickle:
        raise ModelError(
            f"{path} holds only a pickle checkpoint ({pickles[0]}), which can run arbitrary code "
            "when loaded; convert it to safetensors or pass --allow-pickle if you trust it")
    if not pickles:
        raise ModelError(f"{path} has no model weights (*.safetensors)")


def skeleton(path: Path, config=None):
    """The model built on the meta device (no weights read): for checking a plan quickly.
    `config`: the model's transformers config when the caller has read it already."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is None:
        from quant.checkpoint import read_model_config

        read_model_config(path)  # a missing or invalid config.json: one clear line
    with _unsupported(path):
        config = config or AutoConfig.from_pretrained(path)
        check_causal_lm(path, config)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)


def check_causal_lm(path: Path, config) -> None:
    """Refuse a model whose checkpoint is another kind of model (BERT's masked LM would
    otherwise get a fresh random causal head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    architectures = config.architectures or []
    if architectures and not any(a in causal for a in architectures):
        raise ModelError(f"{path}: {architectures[0]} is not a causal language model; lowbit "
                         "quantizes decoder-only LMs (architectures ending in ForCausalLM)")


def load_fp(path: Path, dtype, allow_pickle: bool = False):
    """The model in full precision on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    check_weights(path, allow_pickle)
    with _unsupported(path):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=not allow_pickle or None)
    return model.eval()


@contextlib.contextmanager
def _unsupported(path: Path):
    try:
        yield
    except (ValueError, KeyError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, KeyError) or "recognize" in text or "Unrecognized" in text:
            raise ModelError(f"{path}: unsupported architecture for causal LM quantization "
                             f"({text[:160]})") from None
        raise


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0][:160]})") from None
