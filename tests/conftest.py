import os

# Tests never touch the model hub; kernels run under the Triton interpreter without a GPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_dir():
    from quant import assets

    return assets.model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir):
    from quant.models import load_tokenizer

    return load_tokenizer(demo_dir)


def make_tiny_model(path, tokenizer, *, arch="llama", layers=2, hidden=64, intermediate=96,
                    heads=4, kv_heads=2, seed=0, exact=False):
    """A small random causal LM saved as an fp16 safetensors HF directory. `exact`: its
    matrices are multiples of 2^-14 in [-1/8, 1/8] from an integer generator, the same
    numbers on every machine (a float generator's vectorised paths differ between CPUs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger than the default init so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2 and exact:
                p.copy_(torch.randint(-2048, 2049, p.shape, generator=generator) * 2.0 ** -14)
            elif p.dim() == 2:
                p.normal_(0, 0.08)
    model.to(torch.float16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, demo_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", demo_tokenizer)


@pytest.fixture(scope="session")
def demo_rtn_dir(tmp_path_factory, demo_dir):
    """The demo model, RTN 4-bit group 64 (RTN uses calibration only for its report)."""
    from quant.data import CalibConfig
    from quant.pipeline import QuantizeJob, quantize

    out = tmp_path_factory.mktemp("demo") / "rtn-w4g64"
    return quantize(QuantizeJob("rtn", {"bits": 4, "group_size": 64}, str(demo_dir),
                                CalibConfig(nsamples=2), out, progress=False))


def quantize_one(method, weight, stats=None, name="layer"):
    """(format, report entry) of one weight as `method` plans and quantizes it."""
    return method.quantize(weight, stats, method.plan_layer(name, *weight.shape))
