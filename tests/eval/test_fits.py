"""The fits calculator: weights and KV cache exact against hand counts from published
configs; `quant fits` answers and refuses bad input in one line."""

import json

import pytest
import torch

from quant.errors import ConfigError
from quant.eval import fits
from tests.test_cli import assert_user_error, run

# Parameter counts the model cards publish, against the plan of recipes/models/*.toml
PUBLISHED_PARAMETERS = {
    "llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "mixtral-8x7b-v0.1": 46_702_792_704,
    "gemma-2-9b": 9_241_705_984, "phi-3-mini-4k-instruct": 3_821_079_552,
    "tinyllama-1.1b": 1_100_048_384,
}
LLAMA3_8B_LINEARS = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096),
                     (14336, 4096), (4096, 14336)]  # per block: q, k, v, o, gate, up, down
LLAMA3_8B_KEPT = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096  # embeddings, lm_head, norms


def weights(name: str, scheme: str) -> int:
    return fits.load_model(name).weights_for(scheme, torch.float16).bytes


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_fp16_weights_are_two_bytes_per_published_parameter(name):
    assert weights(name, "fp16") == 2 * PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("scheme,bits", [
    # 4-bit codes; per 128 inputs an fp16 scale and a 4-bit zero per output
    ("gptq:4g128", lambda o, i: o * i * 4 + i // 128 * o * (16 + 4)),
    # the same and act-order's g_idx: an int32 per input column
    ("gptq:4g128-act", lambda o, i: o * i * 4 + i // 128 * o * (16 + 4) + i * 32),
    # a 16-bit code per 8 weights, a 65536 x 8 fp16 codebook, an fp16 scale per row
    ("aqlm:1x16g8", lambda o, i: o * i // 8 * 16 + 65536 * 8 * 16 + o * 16),
    # an 8-bit integer per weight and its groups' scale and zero
    ("int8", lambda o, i: o * i * 8 + i // 128 * o * (16 + 8)),
])
def test_lowbit_weights_of_llama3_8b_by_hand(scheme, bits):
    quantized = 32 * sum(bits(o, i) for o, i in LLAMA3_8B_LINEARS) // 8
    assert weights("llama-3-8b", scheme) == quantized + 2 * LLAMA3_8B_KEPT


def test_estimates_of_other_tools_by_their_storage_rules():
    linear = 32 * sum(o * i for o, i in LLAMA3_8B_LINEARS)
    # bitsandbytes nf4: 4 bits and an fp32 absmax per 64 weights; LLM.int8: a byte and an
    # fp32 scale per row; the rest fp16
    assert weights("llama-3-8b", "nf4") == linear // 2 + linear // 64 * 4 + 2 * LLAMA3_8B_KEPT
    rows = 32 * sum(o for o, _ in LLAMA3_8B_LINEARS)
    assert weights("llama-3-8b", "bnb-int8") == linear + 4 * rows + 2 * LLAMA3_8B_KEPT
    # GGUF Q8_0: 34 bytes per 32 weights for every matrix, norms in F32
    matrices = linear + 2 * 128256 * 4096
    assert weights("llama-3-8b", "q8_0") == matrices // 32 * 34 + 4 * (2 * 32 + 1) * 4096


def kv_per_token(layers, kv_heads, head_dim, nbytes=2):
    return 2 * layers * kv_heads * head_dim * nbytes


@pytest.mark.parametrize("name,tokens,expected", [
    ("llama-3-8b", 8192, kv_per_token(32, 8, 128) * 8192),    # GQA: 8 of 32 heads
    ("llama-2-7b", 4096, kv_per_token(32, 32, 128) * 4096),   # multi-head
    ("qwen2.5-7b", 32768, kv_per_token(28, 4, 128) * 32768),  # its sliding window is off
    # a 4096 window on every layer: a cache keeps its last 4095 tokens
    ("mistral-7b-v0.1", 8192, kv_per_token(32, 8, 128) * 4095),
    ("mistral-7b-v0.3", 8192, kv_per_token(32, 8, 128) * 8192),  # published window: null
    # every other layer a 4096 window
    ("gemma-2-9b", 8192, kv_per_token(21, 8, 256) * 4095 + kv_per_token(21, 8, 256) * 8192),
    # five local layers (1024 window) to one global, 34 layers
    ("gemma-3-4b", 32768, kv_per_token(29, 4, 256) * 1023 + kv_per_token(5, 4, 256) * 32768),
])
def test_kv_cache_by_hand(name, tokens, expected):
    config = fits.load_model(name).config
    assert fits.kv_bytes(config, tokens, 1, 2) == pytest.approx(expected, rel=1e-3)
    assert fits.kv_bytes(config, tokens, 4, 2) == 4 * fits.kv_bytes(config, tokens, 1, 2)
    # transformers' cache keeps the whole prefill until the first decode step
    full = kv_per_token(len(fits.kv_layers(config)), 1, 1) * tokens
    per_layer = fits.features(config)["kv"]
    assert fits.kv_bytes(config, tokens, 1, 2, windowed=False) == full * per_layer


def test_quant_fits_answers_as_json_and_text():
    answer = json.loads(run("fits", "llama-3-8b", "--gpu", "RTX 4090", "--context", "8192",
                            "--quant", "gptq:4g128", "--json").stdout)
    (result,) = answer["results"]
    assert answer["gpu"] == "GeForce RTX 4090" and answer["budget_bytes"] == 24 * 2**30
    assert result["breakdown"]["kv_cache"] == kv_per_token(32, 8, 128) * 8192
    assert result["fits"] and result["largest_context"] == 8192  # the model's maximum
    assert result["gpu_poor"]["Total"] == round(result["total_bytes"] / 2**20)
    assert set(result["gpu_poor"]) == {"Model Size", "KV Cache", "Activation Memory",
                                       "Grad & Optimizer memory", "cuda + other overhead",
                                       "Total"}
    table = run("fits", "llama-3-8b", "--vram", "6GB").stdout
    assert "q4_k_m" in table and "aqlm:2" in table and "* aqlm:2" in table  # best that fits


def test_largest_context_and_batch_fit_the_budget():
    model = fits.load_model("llama-3-8b")
    job = fits.FitsJob(context=1024, quant="aqlm:2")
    budget = 12 * 2**30
    best = fits.largest(job, model, "aqlm:2", budget, "context", 2**20)

    def total(**change) -> int:
        job = fits.FitsJob(**{"context": 1024, **change})
        return fits.estimate(job, model, "aqlm:2")["total_bytes"]

    assert total(context=best) <= budget < total(context=best + 1)
    batch = fits.largest(job, model, "aqlm:2", budget, "batch", 4096)
    assert total(batch=batch) <= budget < total(batch=batch + 1)


@pytest.mark.parametrize("args,pattern", [
    (["llama-3-8x"], "unknown model 'llama-3-8x'; did you mean"),
    (["llama-3-8b", "--gpu", "h1000"], "unknown GPU 'h1000'; did you mean"),
    (["llama-3-8b", "--batch", "0"], "--batch and --context must be positive"),
    (["llama-3-8b", "--vram", "lots"], "give a size like 24GB"),
    (["llama-3-8b", "--quant", "q9_x"], "unknown --quant 'q9_x'"),
    (["llama-3-8b", "--train", "full", "--quant", "nf4"], "--train full trains every weight"),
])
def test_quant_fits_bad_input(args, pattern):
    assert_user_error(run("fits", *args), pattern)


def test_a_context_beyond_the_model_warns_and_answers():
    proc = run("fits", "llama-2-7b", "--vram", "80", "--context", "16384", "--quant", "fp16")
    assert proc.returncode == 0, proc.stderr
    assert "beyond the model's max_position_embeddings (4096)" in proc.stdout


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_user_error(run("fits", str(tmp_path)), "config.json")
    with pytest.raises(ConfigError, match="--kv-dtype"):
        fits.FitsJob(kv_dtype="fp4").validate()
