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
