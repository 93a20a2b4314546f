"""The checkpoint directory (DESIGN.md): writing it atomically, persisting finished blocks
for `--resume`, and checking a directory before anything loads it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
QUANT_METHOD = "lowbit"
REPORT = "quant_report.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"


# ---- small atomic writers ---------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- writing ----------------------------------------------------------------------------

def save_weights(out: Path, tensors: dict[str, torch.Tensor],
                 max_shard_size: str = MAX_SHARD_SIZE) -> dict[str, dict]:
    """Write model.safetensors (sharded with an index above the limit); returns
    {file: {"bytes", "sha256"}} for the report."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    files = {}
    for filename, names in split.filename_to_tensors.items():
        path = out / filename
        write_safetensors(path, {n: tensors[n] for n in names}, metadata={"format": "pt"})
        files[filename] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    if split.is_sharded:
        write_json(out / INDEX, {"metadata": split.metadata,
                                 "weight_map": split.tensor_to_filename})
    return files


# ---- checking ---------------------------------------------------------------------------

def check_safetensors_file(path: Path) -> dict[str, dict]:
    """Header entries ({name: dtype, shape, data_offsets}) of a safetensors file whose header
    and size are consistent."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header") from None
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is truncated or corrupt: {size} bytes on disk, "
                              f"its header describes {8 + n + end}")
    return entries


def weight_files(directory: Path, allow_pickle: bool = False) -> list[Path]:
    if (directory / INDEX).exists():
        index = json.loads((directory / INDEX).read_text())
        return [directory / f for f in sorted(set(index["weight_map"].values()))]
    if (directory / WEIGHTS).exists():
        return [directory / WEIGHTS]
    if any(directory.glob("*.bin")) and not allow_pickle:
        raise CheckpointError(f"{directory} holds a pickle checkpoint (*.bin), which can run "
                              "arbitrary code when loaded; only safetensors are loaded")
    raise CheckpointError(f"{directory} has no {WEIGHTS}")


def read_model_config(directory: Path) -> dict:
    """config.json of a model directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a model directory (no config.json)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{config_path} is not valid JSON") from None


def read_quant_config(directory: Path) -> dict:
    """The lowbit quantization_config of a checkpoint directory."""
    qc = read_model_config(directory).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{directory} is not a lowbit checkpoint "
                              f"(quant_method: {qc.get('quant_method')!r})")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer lowbit (format "
                              f"{qc['format_version']}); upgrade lowbit to load it")
    return qc


def read_report(directory: Path) -> dict:
    path = Path(directory) / REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def verify(directory: Path, checksums: bool = True) -> None:
    """Raise CheckpointError unless every weight file is complete (and matches its recorded
    sha256 when `checksums`)."""
    directory = Path(directory)
    read_quant_config(directory)
    recorded = read_report(directory).get("files", {})
    for path in weight_files(directory):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        check_safetensors_file(path)
        expected = recorded.get(path.name, {}).get("sha256")
        if checksums and expected and sha256(path) != expected:
            raise CheckpointError(f"{path} is corrupt: its sha256 differs from the one "
                                  f"recorded in {REPORT}")


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files(Path(directory)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


# ---- the output directory and the unfinished run ----------------------------------------

OUTPUT_MARKER = ".lowbit-output"  # in every directory lowbit writes that is not a checkpoint


def ours(directory: Path) -> bool:
    """A directory lowbit wrote (a checkpoint, or an export), which --overwrite may replace."""
    return is_lowbit_checkpoint(directory) or (Path(directory) / OUTPUT_MARKER).is_file()


def check_replaceable(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Raise ConfigError unless `out` is free, or asked to be replaced and replaceable:
    --overwrite replaces only what lowbit wrote (or an empty directory), never the user's."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another {flag}")
    if not overwrite:
        raise ConfigError(f"output directory {out} already exists; pass --overwrite to replace "
                          f"it or choose another {flag}")
    if not ours(out) and any(out.iterdir()):
        raise ConfigError(f"{out} is not a lowbit checkpoint or export, and --overwrite replaces "
                          f"only those (nothing of yours is deleted); choose another {flag} or "
                          "empty it yourself")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield an empty sibling directory (marked as ours) that replaces `out` only if the
    block succeeds."""
    out = Path(out)
    check_replaceable(out, overwrite)
    tmp = out.parent / f".{out.name}.lowbit-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / OUTPUT_MARKER).write_text("written by lowbit; quant export --overwrite may replace "
                                     "this directory\n")
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def is_lowbit_checkpoint(directory: Path) -> bool:
    try:
        read_quant_config(directory)
        return True
    except CheckpointError:
        return False


class Staging:
    """An unfinished run next to the output directory: finished blocks as safetensors files,
    plus the settings they were made with. The output appears by one rename at the end."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.root = self.out.parent / f".{self.out.name}.lowbit-partial"
        self.blocks = self.root / "blocks"

    def check(self, fingerprint: dict, resume: bool, overwrite: bool) -> None:
        """Raise ConfigError if an unfinished run is in the way (before any heavy work)."""
        if not self.root.exists() or overwrite and not resume:
            return
        if not resume:
            raise ConfigError(f"an unfinished run for {self.out} exists in {self.root}: "
                              "pass --resume to continue it or --overwrite to start over")
        run_file = self.root / "run.json"
        previous = json.loads(run_file.read_text()) if run_file.exists() else None
        if previous != fingerprint:
            raise ConfigError(f"the unfinished run in {self.root} used other settings; "
                              "rerun with the same settings or pass --overwrite to start over")

    def open(self, fingerprint: dict, resume: bool, overwrite: bool) -> int:
        """Create (or reuse, when resuming) the staging dir; returns the blocks already done."""
        self.check(fingerprint, resume, overwrite)
        if self.root.exists() and not resume:
            shutil.rmtree(self.root)
        if not self.root.exists():
            self.blocks.mkdir(parents=True)
            write_json(self.root / "run.json", fingerprint)
        return self.done_blocks()

    def done_blocks(self) -> int:
        n = 0
        while (self.blocks / f"{n:05d}.safetensors").exists():
            n += 1
        return n

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], modules: dict,
                   report: dict) -> None:
        meta = {"modules": json.dumps(modules), "report": json.dumps(report)}
        write_safetensors(self.blocks / f"{index:05d}.safetensors", tensors, metadata=meta)

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
        path = self.blocks / f"{index:05d}.safetensors"
        check_safetensors_file(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return tensors, json.loads(meta["modules"]), json.loads(meta["report"])

    def final_dir(self) -> Path:
        final = self.root / "final"
        if final.exists():
            shutil.rmtree(final)
        final.mkdir()
        return final

    def publish(self) -> None:
        """Move the finished directory into place (replacing an old one), drop the rest."""
        if self.out.exists():
            os.replace(self.out, self.root / "replaced")
        os.replace(self.root / "final", self.out)
        shutil.rmtree(self.root, ignore_errors=True)
