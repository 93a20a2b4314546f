#!/usr/bin/env bash
# The GPU checks in one place, for a CUDA machine that has no network access.
#
# Here, where pip reaches the package registry (once per machine):
#     scripts/gpu_suite.sh prepare [PYTHON_VERSION]      # default 3.12
#   fills .gpu/ (git-ignored, ~20 MB): wheels of the packages lowbit needs that a stock
#   PyTorch image lacks, at the versions installed here, and an asset cache holding the
#   demo tokenizer and the wiki-demo text (no model weights).
# There, in the repository root, with .gpu/ copied along:
#     scripts/gpu_suite.sh STAGE OUTDIR
#   tests     the tests that need no demo weights, on CUDA (kernels compiled, not
#             interpreted), and the sm_90 compile check
#   kernels   scripts/bench_kernels.py: its int and codebook rows against fp16
#   tune      the same with --tune for 4-bit and the paper's two codebook shapes at
#             batch 1 and 16: the winning tiles, kernels/configs/<gpu>.json, land in OUTDIR
#             (tune-int and tune-codebook run one half each, for two calls where one
#             would pass the time limit: commit the first half's configs file before the
#             second, which merges into it)
#   quantize  scripts/bench_quantize.py on random Llama-7B-shaped blocks: GPTQ 4-bit g128
#             (two blocks), AQLM 1x16 g8 (one block, then distillation)
# DRY_RUN=1 runs a stage's wiring on a CPU (interpreted kernels, tiny shapes; after
# `prepare` for this machine's Python version).
# Each stage is meant to fit a 10-minute limit on an H100 (not yet measured); JSON results
# and logs go to OUTDIR. A failing step is reported and the stage goes on; the exit code
# says whether any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: scripts/gpu_suite.sh prepare [PYVER] | tests|kernels|tune[-int|-codebook]|quantize OUTDIR}
PACKAGES=(transformers datasets gguf dill multiprocess)  # absent or too old in the image

prepare() {
    local py=${1:-3.12} versions
    versions=$(python -c "import importlib.metadata as m, sys
print(' '.join(f'{name}=={m.version(name)}' for name in sys.argv[1:]))" "${PACKAGES[@]}")
    rm -rf .gpu/wheels && mkdir -p .gpu/wheels
    python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels $versions
    python - <<'EOF'
import shutil
from pathlib import Path

from quant import assets

cache = Path(".gpu/cache")
model = assets.model_dir(assets.DEFAULT_MODEL)
(cache / "models" / model.name).mkdir(parents=True, exist_ok=True)
for file in model.iterdir():  # config and tokenizer: tiny models and calibration need them
    if file.suffix != ".safetensors":
        shutil.copy(file, cache / "models" / model.name / file.name)
text = assets.text_path("wiki-demo")
target = cache / text.relative_to(assets.cache_dir())
target.parent.mkdir(parents=True, exist_ok=True)
shutil.copy(text, target)
EOF
    du -sh .gpu
}

setup_device() {
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/lowbit-site .gpu/wheels/*.whl
    export PYTHONPATH="$PWD:/tmp/lowbit-site${PYTHONPATH:+:$PYTHONPATH}"
    export LOWBIT_CACHE="$PWD/.gpu/cache" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export PYTHONUNBUFFERED=1
    if [[ -n ${DRY_RUN:-} ]]; then
        dry=(--dry-run) aqlm_shape=(--codebooks 1x8 --in-group 4)  # tiny layers: 256 codewords
        return
    fi
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name())"
}

if [[ $stage == prepare ]]; then
    prepare "${2:-}"
    exit 0
fi
out=${2:?give the output directory}
mkdir -p "$out"
failed=0 dry=() aqlm_shape=(--codebooks 1x16 --in-group 8)
setup_device
step() {  # step LOG COMMAND...: run it, its output also into OUTDIR/LOG
    local log=$1
    shift
    echo "+ $*"
    "$@" 2>&1 | tee "$out/$log" || { echo "FAILED: $*"; failed=1; }
}
case $stage in
    tests)
        step tests.log python3 -m pytest -q -m "not demo" -p no:cacheprovider tests
        step compile_sm90.log python3 scripts/compile_sm90.py --json
        ;;
    kernels)
        step kernels.log python3 scripts/bench_kernels.py "${dry[@]}" --out "$out"
        ;;
    tune|tune-int|tune-codebook)  # each part merges its winners into the configs file
        if [[ $stage != tune-codebook ]]; then
            step tune-int.log python3 scripts/bench_kernels.py "${dry[@]}" --tune --bits 4 \
                --batches 1 16 --codebooks --out "$out"
        fi
        if [[ $stage != tune-int ]]; then
            step tune-codebook.log python3 scripts/bench_kernels.py "${dry[@]}" --tune --bits \
                --batches 1 16 --codebooks 1x16g8 2x8g8 --out "$out"
        fi
        cp kernels/configs/*.json "$out/" 2>/dev/null || echo "no tuned configs written"
        ;;
    quantize)
        # group size: the default, 128 on 7B layers
        step quantize-gptq.log python3 scripts/bench_quantize.py "${dry[@]}" --method gptq \
            --bits 4 --out "$out/quantize-gptq.json"
        step quantize-aqlm.log python3 scripts/bench_quantize.py "${dry[@]}" --method aqlm \
            --blocks 1 "${aqlm_shape[@]}" --out "$out/quantize-aqlm.json"
        ;;
    *)
        echo "unknown stage $stage (prepare, tests, kernels, tune[-int|-codebook], quantize)" >&2
        exit 2
        ;;
esac
exit $failed
