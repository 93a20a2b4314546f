"""Calibration and evaluation text: named data sets and local files, tokenized into
fixed-length windows.

Every data set has two token streams: a calibration pool (random windows are drawn only
from it) and an evaluation split (cut into non-overlapping windows). `wiki-demo` is the
offline set whose protocol tests and issues quote numbers in; it must not change.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from quant import assets
from quant.errors import ConfigError, DataError

WIKI_DEMO_EVAL_TOKENS = 40 * 512
DOMAIN_EVAL_TOKENS = 32 * 512  # every other demo domain's held-out tail
# mix-demo: calibration windows drawn from each domain's calibration part, in these parts.
# Equal parts: the figure we quote is the unweighted geometric mean over the domains, so
# each domain weighs the same in the calibration that is fitted for it.
MIX_DEMO = {"wiki-demo": 1, "c4-demo": 1, "code-demo": 1, "multilingual-demo": 1,
            "technical-demo": 1, "tiny-demo": 1}
ALL_DEMO = "all-demo"  # quant eval --ppl all-demo: every demo domain's evaluation split
LOCAL_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                  ".parquet": "parquet"}
HUB_SETS = ("wikitext2", "c4", "redpajama")


def demo_sets() -> list[str]:
    """The offline demo data sets, each with a calibration part and a held-out tail."""
    return list(assets.TEXTS)


def known_sets() -> list[str]:
    return [*demo_sets(), "mix-demo", *HUB_SETS]


@dataclass(frozen=True)
class CalibConfig:
    dataset: str = "mix-demo"
    nsamples: int | None = None  # None: the method's default (Method.calibration.nsamples)
    seqlen: int = 512
    seed: int = 0

    def with_default_nsamples(self, nsamples: int) -> "CalibConfig":
        count = self_count(self.dataset)  # self:N fixes the number of windows
        if self.nsamples is None:
            return dataclasses.replace(self, nsamples=count or nsamples)
        if count is not None and count != self.nsamples:
            raise ConfigError(f"--calib {self.dataset} makes {count} windows; drop --nsamples "
                              f"{self.nsamples} or make it {count}")
        return self

    def validate(self) -> "CalibConfig":
        if self.nsamples is not None and self.nsamples < 1:
            raise ConfigError(f"--nsamples must be at least 1 (got {self.nsamples})")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2 (got {self.seqlen})")
        check_dataset_name(self.dataset)
        return self


SELF_PREFIX = "self:"  # --calib self:N: N sequences sampled from the fp model itself


def self_count(name: str) -> int | None:
    """N of a `self:N` data set name, else None."""
    if not name.startswith(SELF_PREFIX):
        return None
    count = name[len(SELF_PREFIX):]
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--calib {name}: self:N needs a whole number of sequences N >= 1")
    return int(count)


def check_dataset_name(name: str) -> None:
    if name in known_sets() or self_count(name) is not None or hub_spec(name) is not None:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ConfigError(
            f"unknown data set {name!r}: use one of {', '.join(known_sets())}, self:N, "
            f"a datasets name as {HUB_FORM}, a dataset folder, or a file ending in "
            f"{', '.join(LOCAL_SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"data file {name} does not exist")


HUB_FORM = "NAME:CONFIG:SPLIT"  # e.g. wikitext:wikitext-2-raw-v1:test; NAME::SPLIT, NAME:CONFIG


@dataclass(frozen=True)
class HubSpec:
    """A `datasets` data set: a hub name or local folder, a config, a split."""

    path: str
    config: str | None
    split: str | None


def hub_spec(name: str) -> HubSpec | None:
    """The parts of a NAME:CONFIG:SPLIT data set name, or None for other names."""
    if ":" not in name or name.startswith(SELF_PREFIX):
        return None
    parts = name.split(":")
    if len(parts) > 3 or not parts[0] or not any(parts[1:]):
        raise ConfigError(f"data set {name!r}: write a datasets name as {HUB_FORM}, "
                          "NAME::SPLIT or NAME:CONFIG")
    path, config, split = (parts + [""])[:3]
    return HubSpec(path, config or None, split or None)


def check_eval_name(name: str) -> None:
    """A data set with an evaluation split (not self:N, which is only sampled)."""
    check_dataset_name(name)
    if self_count(name) is not None:
        raise ConfigError(f"{name} is sampled from the model for calibration; it has no "
                          "text to evaluate on")


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
    """(calibration text, evaluation text or None) of a named hub data set."""
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1")
            return _joined(ds["train"], name), _joined(ds["test"], name)
        if name == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = load_dataset("allenai/c4", data_files=files)
            return ("\n\n".join(ds["train"][:20000]["text"]),
                    "\n\n".join(ds["validation"][:1100]["text"]))
        ds = load_dataset("togethercomputer/RedPajama-Data-1T-Sample", split="train")
        return "\n\n".join(ds[:20000]["text"]), None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"could not load data set {name} from the hub (offline?): "
                        f"{str(exc).splitlines()[0][:160]}; use wiki-demo or a local file") from None


@functools.lru_cache(maxsize=4)  # an evaluation reads the text twice: windows and its hash
def _dataset_texts(name: str) -> tuple[str, str | None]:
    """(calibration text, evaluation text or None) of a NAME:CONFIG:SPLIT name or a dataset
    folder: with a split, that split for both; else train (or the first split) to
    calibrate and test (or validation) to evaluate."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    spec = hub_spec(name) or HubSpec(name, None, None)
    folder = Path(spec.path).expanduser()
    try:
        if folder.is_dir() and any((folder / f).is_file() for f in SAVED_MARKERS):
            ds = load_from_disk(str(folder))
            ds = ds[spec.split] if spec.split and isinstance(ds, DatasetDict) else ds
        else:
            ds = load_dataset(str(folder) if folder.is_dir() else spec.path, spec.config,
                              split=spec.split)
    except Exception as exc:
        where = "" if folder.is_dir() else " (a hub name needs a connection or the cache)"
        raise DataError(f"could not load data set {name}{where}: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    if not isinstance(ds, DatasetDict):
        text = _joined(ds, name)
        return text, text
    calib = "train" if "train" in ds else next(iter(ds))
    held_out = next((s for s in ("test", "validation") if s in ds), None)
    return _joined(ds[calib], name), held_out and _joined(ds[held_out], name)


SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes


def _joined(ds, name: str) -> str:
    """The GPTQ protocol's text: every row's text joined with a blank line (empty rows
    too, as GPTQ joins wikitext)."""
    if "text" not in ds.column_names:
        raise DataError(f"data set {name} has no 'text' column (columns: "
                        f"{', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t is not None)


def text_sha256(name: str) -> str:
    """sha256 of the text a data set's evaluation split is cut from: the demo file (its
    tail is held out by tokens), or the evaluation text itself."""
    if name in assets.TEXTS:
        return hashlib.sha256(assets.text_path(name).read_bytes()).hexdigest()
    if name == "mix-demo":
        return hashlib.sha256("".join(text_sha256(n) for n in MIX_DEMO).encode()).hexdigest()
    if name in HUB_SETS:
        text = _hub_texts(name)[1] or ""
    elif hub_spec(name) is not None or Path(name).expanduser().is_dir():
        text = _dataset_texts(name)[1] or ""
    else:
        text = _local_text(Path(name).expanduser())
    return hashlib.sha256(text.encode()).hexdigest()


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
    """(calibration pool, evaluation split) token ids of a data set (not mix-demo, which
    has no pool of its own)."""
    check_eval_name(name)
    if name in assets.TEXTS:
        return demo_splits(name, tokenizer)
    if name in HUB_SETS:
        calib, evaluation = _hub_texts(name)
        return encode(tokenizer, calib), None if evaluation is None else encode(tokenizer, evaluation)
    if name == "mix-demo":
        raise ConfigError("mix-demo has no single token pool (it mixes the demo domains)")
    if hub_spec(name) is not None or Path(name).expanduser().is_dir():
        calib, evaluation = _dataset_texts(name)
        return encode(tokenizer, calib), None if evaluation is None else encode(tokenizer, evaluation)
    ids = encode(tokenizer, _local_text(Path(name).expanduser()))
    return ids, ids


def demo_splits(name: str, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A demo domain's (calibration part, held-out tail): the text is tokenized whole and
    its last WIKI_DEMO_EVAL_TOKENS (wiki-demo) or DOMAIN_EVAL_TOKENS (the others) tokens
    are held out."""
    if name == "wiki-demo":
        text = wiki_demo_text()
    else:
        text = assets.text_path(name).read_text(encoding="utf-8")
    ids = encode(tokenizer, text)
    tail = WIKI_DEMO_EVAL_TOKENS if name == "wiki-demo" else DOMAIN_EVAL_TOKENS
    if len(ids) < 2 * tail:
        raise DataError(f"{name} is only {len(ids)} tokens with this tokenizer, too few for "
                        f"a {tail}-token evaluation tail and a calibration part")
    return ids[:-tail], ids[-tail:]


def calibration_windows(cfg: CalibConfig, tokenizer, model=None) -> torch.Tensor:
    """[nsamples, seqlen] random windows of the calibration pool (GPTQ's sampling); for
    mix-demo, of every domain's pool in the MIX_DEMO parts, interleaved; for self:N,
    sequences `model` samples itself."""
    cfg.validate()
    if cfg.nsamples is None:
        raise ConfigError("the number of calibration windows is not set (the pipeline uses "
                          "the method's default)")
    if self_count(cfg.dataset) is not None:
        return self_generated(model, tokenizer, cfg)
    if cfg.dataset == "mix-demo":
        return mix_windows(cfg, tokenizer)
    pool, _ = token_splits(cfg.dataset, tokenizer)
    return sample_windows(pool, cfg, source=cfg.dataset)


def mix_shares(nsamples: int) -> dict[str, int]:
    """Windows per domain of a mix-demo calibration set: nsamples split in the MIX_DEMO
    parts, remainders to the largest fractions (ties in MIX_DEMO's order)."""
    total = sum(MIX_DEMO.values())
    exact = {name: nsamples * part / total for name, part in MIX_DEMO.items()}
    shares = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(MIX_DEMO, key=lambda n: -(exact[n] - shares[n]))
    for name in by_remainder[: nsamples - sum(shares.values())]:
        shares[name] += 1
    return shares


def mix_windows(cfg: CalibConfig, tokenizer) -> torch.Tensor:
    pools = {name: demo_splits(name, tokenizer)[0] for name in MIX_DEMO}
    shares = mix_shares(cfg.nsamples)
    for name in MIX_DEMO:
        if shares[name] * cfg.seqlen > len(pools[name]):
            total = sum(MIX_DEMO.values())
            most = min(len(pools[n]) // cfg.seqlen * total // part
                       for n, part in MIX_DEMO.items())
            raise DataError(
                f"mix-demo: {name} gives {shares[name]} of the {cfg.nsamples} windows, more "
                f"than its {len(pools[name])} calibration tokens hold at --seqlen "
                f"{cfg.seqlen}; at most about --nsamples {most} at this --seqlen")
    drawn = [sample_windows(pools[name], dataclasses.replace(
                 cfg, nsamples=shares[name], seed=cfg.seed * 1000 + number), source=name)
             for number, name in enumerate(MIX_DEMO) if shares[name]]
    order = [(i, d) for d, windows in enumerate(drawn) for i in range(len(windows))]
    order.sort()  # round-robin: any prefix of the set covers the domains evenly
    return torch.stack([drawn[d][i] for i, d in order])


SELF_BATCH = 16  # sequences sampled together


def self_generated(model, tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """[nsamples, seqlen] token sequences sampled from `model` (temperature 1, the full
    distribution, no early stop), each started from the tokenizer's BOS token (else its
    EOS token, the document separator): a data-free calibration set in the model's own
    distribution."""
    if model is None:
        raise ConfigError(f"--calib {cfg.dataset} samples from the model; it needs the model")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    if start is None:
        raise DataError(f"--calib {cfg.dataset}: the tokenizer has neither a BOS nor an EOS "
                        "token to start sampling from; use a data set")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    rows = []
    with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(cfg.seed)
        for first in tqdm(range(0, cfg.nsamples, SELF_BATCH), desc=f"sampling {cfg.dataset}",
                          unit="batch"):
            count = min(SELF_BATCH, cfg.nsamples - first)
            rows.append(model.generate(
                torch.full((count, 1), start, device=device), do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=cfg.seqlen - 1,
                min_new_tokens=cfg.seqlen - 1, pad_token_id=start,
                attention_mask=torch.ones(count, 1, dtype=torch.long, device=device)))
    return torch.cat(rows).cpu()


def sample_windows(pool: torch.Tensor, cfg: CalibConfig, source: str = "text") -> torch.Tensor:
    needed = cfg.nsamples * cfg.seqlen
    if len(pool) < needed or len(pool) <= cfg.seqlen + 1:
        most = (len(pool) - 1) // cfg.seqlen
        advice = (f"at most --nsamples {most} at this --seqlen" if most else
                  "a shorter --seqlen") + ", or give more text"
        raise DataError(
            f"calibration text {source} has {len(pool)} tokens, fewer than nsamples x seqlen = "
            f"{cfg.nsamples} x {cfg.seqlen} = {needed}; {advice}")
    random.seed(cfg.seed)
    starts = [random.randint(0, len(pool) - cfg.seqlen - 1) for _ in range(cfg.nsamples)]
    return torch.stack([pool[s:s + cfg.seqlen] for s in starts])


def eval_windows(name: str, tokenizer, seqlen: int) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of the evaluation split (mix-demo: every demo
    domain's, in turn)."""
    if name == "mix-demo":
        return torch.cat([eval_windows(n, tokenizer, seqlen) for n in MIX_DEMO])
    _, ids = token_splits(name, tokenizer)
    if ids is None:
        raise DataError(f"data set {name} has no evaluation split; name one "
                        f"({HUB_FORM}), or use a demo set, wikitext2, c4 or a local file")
    n = len(ids) // seqlen
    if n == 0:
        raise DataError(f"evaluation text {name} has {len(ids)} tokens, fewer than one window "
                        f"of --seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)
