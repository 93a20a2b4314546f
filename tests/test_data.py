import collections
import dataclasses
import json
import random
import re

import pytest
import torch

from quant import assets, data
from quant.errors import ConfigError, DataError


def test_wiki_demo_protocol(demo_tokenizer):
    raw = assets.text_path("wiki-demo").read_text(encoding="utf-8")
    # Independent parse: split on the closing marker, drop the opening line.
    docs = []
    for chunk in raw.split("\n</doc>\n"):
        body = re.sub(r"^\s*<doc [^\n]*\n", "", chunk)
        if body.strip():
            docs.append(body.strip())
    assert data.wiki_demo_text() == "\n\n".join(docs)

    pool, held_out = data.token_splits("wiki-demo", demo_tokenizer)
    assert len(held_out) == 40 * 512
    assert 455_000 < len(pool) + len(held_out) < 462_000  # ~459k SmolLM2 tokens
    windows = data.eval_windows("wiki-demo", demo_tokenizer, 512)
    assert windows.shape == (40, 512) and torch.equal(windows.flatten(), held_out)


def test_calibration_windows_follow_gptq_sampling(demo_tokenizer):
    cfg = data.CalibConfig("wiki-demo", nsamples=5, seqlen=64, seed=3)
    windows = data.calibration_windows(cfg, demo_tokenizer)
    pool, _ = data.token_splits("wiki-demo", demo_tokenizer)
    random.seed(3)
    for row in windows:
        i = random.randint(0, len(pool) - 64 - 1)
        assert torch.equal(row, pool[i:i + 64])


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files(tmp_path, demo_tokenizer, suffix):
    docs = [f"Document number {i} talks about quantization of weights." * 3 for i in range(30)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": docs}), str(path))
    pool, held_out = data.token_splits(str(path), demo_tokenizer)
    expected = demo_tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    assert pool.tolist() == expected and torch.equal(pool, held_out)
    windows = data.calibration_windows(data.CalibConfig(str(path), 4, 32, 0), demo_tokenizer)
    assert windows.shape == (4, 32)


def test_text_too_short(tmp_path, demo_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("only a few words here")
    with pytest.raises(DataError, match="fewer than nsamples x seqlen"):
        data.calibration_windows(data.CalibConfig(str(path), 8, 64, 0), demo_tokenizer)


def test_bad_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown data set"):
        data.CalibConfig("wikitext103").validate()
    with pytest.raises(DataError, match="does not exist"):
        data.CalibConfig(str(tmp_path / "missing.txt")).validate()
    with pytest.raises(ConfigError, match="--nsamples"):
        data.CalibConfig(nsamples=0).validate()
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no 'text' column"):
        data.token_splits(str(bad), None)


# ---- the demo domains and mix-demo ------------------------------------------------------

# First tokens of each demo split (SmolLM2 tokenizer) and the text's whole token count:
# the splits are fixed, so numbers measured on them stay comparable.
PINNED_SPLITS = {
    "wiki-demo": ([34, 32, 32, 39, 3284, 10158, 8339, 281],
                  [281, 260, 372, 2178, 522, 662, 16463, 30], 458603),
    "c4-demo": ([21892, 390, 429, 3227, 10599, 288, 3764, 10599],
                [933, 44846, 136, 30567, 126, 177, 221, 223], 78190),
    "code-demo": ([17377, 1485, 30, 103, 333, 907, 20, 32],
                  [198, 107, 3805, 476, 5903, 1799, 476, 33], 90849),
    "multilingual-demo": ([49, 1913, 10764, 578, 826, 260, 19390, 284],
                          [5470, 248, 9175, 27714, 36529, 18408, 21985, 12681], 95090),
    "technical-demo": ([28845, 6966, 198, 198, 45508, 314, 38552, 8722],
                       [43, 30461, 506, 6783, 312, 608, 258, 314], 43768),
    "tiny-demo": ([2705, 1194, 28, 253, 1838, 8180, 3365, 14176],
                  [614, 30, 15218, 2001, 28, 384, 436, 1147], 62380),
}


def test_demo_splits_are_pinned(demo_tokenizer):
    assert set(data.demo_sets()) == set(PINNED_SPLITS)
    for name, (calib_head, eval_head, total) in PINNED_SPLITS.items():
        pool, held_out = data.token_splits(name, demo_tokenizer)
        assert pool[:8].tolist() == calib_head and held_out[:8].tolist() == eval_head, name
        assert len(pool) + len(held_out) == total, name
        assert len(held_out) == (40 if name == "wiki-demo" else 32) * 512
        if name != "wiki-demo":  # the raw file, tokenized independently, is pool + tail
            raw = assets.text_path(name).read_text(encoding="utf-8")
            assert torch.cat([pool, held_out]).tolist() == \
                demo_tokenizer(raw, add_special_tokens=False)["input_ids"]
        windows = data.eval_windows(name, demo_tokenizer, 512)
        assert len(windows) >= 16 and torch.equal(windows.flatten(), held_out)


def test_calibration_never_overlaps_evaluation(demo_tokenizer):
    """Calibration windows (mix-demo, and every domain alone) come from the calibration
    parts: a window drawn from a held-out tail would share all its 32-token runs with it.
    The texts repeat some boilerplate (a web archive's month list, a wiki species
    template), so a window may share a few runs with a tail by the text itself."""
    n = 32
    held_out = set()
    for name in data.demo_sets():
        tail = data.token_splits(name, demo_tokenizer)[1].tolist()
        held_out |= {tuple(tail[i:i + n]) for i in range(len(tail) - n + 1)}
    sets = [data.calibration_windows(data.CalibConfig("mix-demo", 128, 512, 0), demo_tokenizer)]
    sets += [data.calibration_windows(data.CalibConfig(name, 16, 512, 1), demo_tokenizer)
             for name in data.demo_sets()]
    shared = [sum(tuple(row[i:i + n]) in held_out for i in range(512 - n + 1)) / (512 - n + 1)
              for windows in sets for row in windows.tolist()]
    assert max(shared) < 0.1 and sum(shared) / len(shared) < 0.01


def test_mix_demo_draws_every_domain_in_equal_parts(demo_tokenizer):
    windows = data.calibration_windows(data.CalibConfig("mix-demo", 128, 512, 0), demo_tokenizer)
    assert windows.shape == (128, 512)
    again = data.calibration_windows(data.CalibConfig("mix-demo", 128, 512, 0), demo_tokenizer)
    assert torch.equal(windows, again)
    pools = {name: data.token_splits(name, demo_tokenizer)[0] for name in data.demo_sets()}

    def domain(row: torch.Tensor) -> str:
        found = [name for name, pool in pools.items()
                 if any(torch.equal(pool[s:s + 512], row)
                        for s in (pool[:-512] == row[0]).nonzero().flatten().tolist())]
        assert len(found) == 1
        return found[0]

    counts = collections.Counter(domain(row) for row in windows)
    assert sorted(counts.values()) == [21, 21, 21, 21, 22, 22]  # 128 = 6 x 21 + 2
    first = [domain(row) for row in windows[:6]]  # interleaved: any prefix is mixed
    assert sorted(first) == sorted(data.demo_sets())


def test_demo_data_errors(demo_tokenizer):
    with pytest.raises(ConfigError, match="unknown data set 'news-demo'.*tiny-demo"):
        data.CalibConfig("news-demo").validate()
    with pytest.raises(DataError, match=r"at most --nsamples 53 at this --seqlen"):
        data.calibration_windows(data.CalibConfig("technical-demo", 60, 512, 0), demo_tokenizer)
    with pytest.raises(DataError, match=r"technical-demo gives .*at most about --nsamples 318"):
        data.calibration_windows(data.CalibConfig("mix-demo", 400, 512, 0), demo_tokenizer)


def test_self_generated_calibration(tiny_dir):
    """self:N samples N sequences of --seqlen tokens from the model, each from its BOS
    token; the seed fixes them, and they follow the model's own distribution."""
    from quant.models import load_fp, load_tokenizer

    model, tokenizer = load_fp(tiny_dir, torch.float32), load_tokenizer(tiny_dir)
    cfg = data.CalibConfig("self:3", seqlen=12).with_default_nsamples(128)
    assert cfg.nsamples == 3
    windows = data.calibration_windows(cfg, tokenizer, model)
    assert windows.shape == (3, 12) and (windows[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(windows, data.calibration_windows(cfg, tokenizer, model))
    other = data.calibration_windows(dataclasses.replace(cfg, seed=1), tokenizer, model)
    assert not torch.equal(windows, other)
    # each sampled token is one the model gives real probability (the tiny model is near
    # uniform over 49k tokens, so a token drawn from anything else would look the same:
    # check against a model made peaked instead)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
        peaked = data.calibration_windows(cfg, tokenizer, model)
        probs = torch.softmax(model(peaked).logits[:, :-1].float(), -1)
        picked = probs.gather(-1, peaked[:, 1:, None]).squeeze(-1)
    assert picked.log().mean() > probs.max(-1).values.log().mean() - 3.0
    with pytest.raises(ConfigError, match="it needs the model"):
        data.calibration_windows(cfg, tokenizer)


def _texts(prefix, n):
    return [f"{prefix} row {i}: weights, scales and zero points." * (1 + i % 3) for i in range(n)]


@pytest.fixture(scope="module")
def dataset_folders(tmp_path_factory):
    """A datasets folder with two configs declared in its README (the layout hub data sets
    use), and a DatasetDict saved with save_to_disk."""
    import datasets

    root = tmp_path_factory.mktemp("datasets")
    hub = root / "hubstyle"
    for config in ("small", "other"):
        for split in ("train", "test"):
            (hub / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict({"text": _texts(f"{config} {split}", 40),
                                        "id": list(range(40))}).to_parquet(
                str(hub / config / f"{split}.parquet"))
    (hub / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.parquet\n"
        f"  - split: test\n    path: {c}/test.parquet\n" for c in ("small", "other")) + "---\n")
    saved = root / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": _texts("saved train", 40)}),
        "validation": datasets.Dataset.from_dict({"text": _texts("saved validation", 40)}),
    }).save_to_disk(str(saved))
    return hub, saved


def test_datasets_names_with_config_and_split(dataset_folders, demo_tokenizer):
    """NAME:CONFIG:SPLIT and dataset folders follow the GPTQ protocol: the split's rows
    joined with a blank line, tokenized as the tokenizer does (BOS where it adds one),
    cut into non-overlapping windows; the result names the text by its sha256."""
    import hashlib

    hub, saved = dataset_folders
    cases = {f"{hub}:other:test": ("other test", "other test"),
             f"{hub}:small": ("small train", "small test"),       # train to calibrate, test to eval
             f"{saved}": ("saved train", "saved validation"),
             f"{saved}::train": ("saved train", "saved train")}
    for name, (calib_prefix, eval_prefix) in cases.items():
        data.check_eval_name(name)
        pool, held_out = data.token_splits(name, demo_tokenizer)
        for ids, prefix in ((pool, calib_prefix), (held_out, eval_prefix)):
            joined = "\n\n".join(_texts(prefix, 40))
            assert ids.tolist() == demo_tokenizer(joined)["input_ids"], name
        joined = "\n\n".join(_texts(eval_prefix, 40))
        assert data.text_sha256(name) == hashlib.sha256(joined.encode()).hexdigest()
        windows = data.eval_windows(name, demo_tokenizer, 64)
        assert windows.shape == (len(held_out) // 64, 64)
        assert torch.equal(windows.flatten(), held_out[: windows.numel()])


def test_bad_datasets_names(dataset_folders, tmp_path):
    hub, _ = dataset_folders
    for name in ("a:b:c:d", ":test", "wikitext:"):
        with pytest.raises(ConfigError, match="NAME:CONFIG:SPLIT"):
            data.check_dataset_name(name)
    with pytest.raises(DataError, match="could not load data set .*nope"):
        data.token_splits(f"{hub}:nope:test", None)
    with pytest.raises(DataError, match="needs a connection or the cache"):
        data.token_splits("no-such-org/no-such-set::test", None)
    import datasets

    datasets.Dataset.from_dict({"body": ["x"] * 3}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(DataError, match="no 'text' column .*body"):
        data.token_splits(str(tmp_path / "nocol"), None)
