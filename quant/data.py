"""Calibration and evaluation text: named data sets and local files, tokenized into
fixed-length windows.

Every data set has two token streams: a calibration pool (random windows are drawn only
from it) and an evaluation split (cut into non-overlapping windows). `wiki-demo` is the
offline set whose protocol tests and issues quote numbers in; it must not change.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from quant import assets
from quant.errors import ConfigError, DataError

WIKI_DEMO_EVAL_TOKENS = 40 * 512
LOCAL_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                  ".parquet": "parquet"}
HUB_SETS = ("wikitext2", "c4", "redpajama")


@dataclass(frozen=True)
class CalibConfig:
    dataset: str = "wiki-demo"
    nsamples: int | None = None  # None: the method's default (Method.calibration.nsamples)
    seqlen: int = 512
    seed: int = 0

    def with_default_nsamples(self, nsamples: int) -> "CalibConfig":
        return self if self.nsamples is not None else dataclasses.replace(self, nsamples=nsamples)

    def validate(self) -> "CalibConfig":
        if self.nsamples is not None and self.nsamples < 1:
            raise ConfigError(f"--nsamples must be at least 1 (got {self.nsamples})")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2 (got {self.seqlen})")
        check_dataset_name(self.dataset)
        return self


def check_dataset_name(name: str) -> None:
    if name in assets.TEXTS or name in HUB_SETS:
        return
    path = Path(name).expanduser()
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ConfigError(
            f"unknown data set {name!r}: use one of {', '.join([*assets.TEXTS, *HUB_SETS])} "
            f"or a file ending in {', '.join(LOCAL_SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"data file {name} does not exist")


# ---- text ------------------------------------------------------------------------------

def wiki_demo_text() -> str:
    """Documents of the demo dump: <doc> markers dropped, lines joined, docs joined by a blank line."""
    docs, lines = [], []
    with open(assets.text_path("wiki-demo"), encoding="utf-8") as f:
        for line in f.read().split("\n"):
            if line.startswith("<doc "):
                lines = []
            elif line == "</doc>":
                docs.append("\n".join(lines).strip())
                lines = []
            else:
                lines.append(line)
    if lines and "\n".join(lines).strip():
        docs.append("\n".join(lines).strip())
    return "\n\n".join(docs)


def _local_text(path: Path) -> str:
    from datasets import load_dataset
    from datasets.utils import logging as ds_logging

    builder = LOCAL_SUFFIXES[path.suffix.lower()]
    options = {"sample_by": "document"} if builder == "text" else {}
    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # a local file reads in moments; no bars
    try:
        ds = load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:
        raise DataError(f"could not read {path}: {str(exc).splitlines()[0][:200]}") from None
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()
    if "text" not in ds.column_names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t)


def _hub_texts(name: str) -> tuple[str, str | None]:
    """(calibration text, evaluation text or None) of a hub data set."""
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1")
            return "\n\n".join(ds["train"]["text"]), "\n\n".join(ds["test"]["text"])
        if name == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = load_dataset("allenai/c4", data_files=files)
            return ("\n\n".join(ds["train"][:20000]["text"]),
                    "\n\n".join(ds["validation"][:1100]["text"]))
        ds = load_dataset("togethercomputer/RedPajama-Data-1T-Sample", split="train")
        return "\n\n".join(ds[:20000]["text"]), None
    except Exception as exc:
        raise DataError(f"could not load data set {name} from the hub (offline?): "
                        f"{str(exc).splitlines()[0][:160]}; use wiki-demo or a local file") from None


# ---- tokens ----------------------------------------------------------------------------

def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` in one pass; a single BOS first where the tokenizer adds one."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    if bos is not None and probe and probe[0] == bos:
        ids = [bos, *ids]
    return torch.tensor(ids, dtype=torch.long)


def token_splits(name: str, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibration pool, evaluation split) token ids of a data set."""
    check_dataset_name(name)
    if name == "wiki-demo":
        ids = encode(tokenizer, wiki_demo_text())
        return ids[:-WIKI_DEMO_EVAL_TOKENS], ids[-WIKI_DEMO_EVAL_TOKENS:]
    if name in HUB_SETS:
        calib, evaluation = _hub_texts(name)
        return encode(tokenizer, calib), None if evaluation is None else encode(tokenizer, evaluation)
    ids = encode(tokenizer, _local_text(Path(name).expanduser()))
    return ids, ids


def calibration_windows(cfg: CalibConfig, tokenizer) -> torch.Tensor:
    """[nsamples, seqlen] random windows of the calibration pool (GPTQ's sampling)."""
    cfg.validate()
    if cfg.nsamples is None:
        raise ConfigError("the number of calibration windows is not set (the pipeline uses "
                          "the method's default)")
    pool, _ = token_splits(cfg.dataset, tokenizer)
    return sample_windows(pool, cfg, source=cfg.dataset)


def sample_windows(pool: torch.Tensor, cfg: CalibConfig, source: str = "text") -> torch.Tensor:
    needed = cfg.nsamples * cfg.seqlen
    if len(pool) < needed or len(pool) <= cfg.seqlen + 1:
        raise DataError(
            f"calibration text {source} has {len(pool)} tokens, fewer than nsamples x seqlen = "
            f"{cfg.nsamples} x {cfg.seqlen} = {needed}; lower --nsamples/--seqlen or give more text")
    random.seed(cfg.seed)
    starts = [random.randint(0, len(pool) - cfg.seqlen - 1) for _ in range(cfg.nsamples)]
    return torch.stack([pool[s:s + cfg.seqlen] for s in starts])


def eval_windows(name: str, tokenizer, seqlen: int) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of the evaluation split."""
    _, ids = token_splits(name, tokenizer)
    if ids is None:
        raise DataError(f"data set {name} has no evaluation split; use wiki-demo, wikitext2, "
                        "c4 or a local file")
    n = len(ids) // seqlen
    if n == 0:
        raise DataError(f"evaluation text {name} has {len(ids)} tokens, fewer than one window "
                        f"of --seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)
