"""AQLM 1x16 g8 against GPTQ 2-bit g128 on one synthetic Llama-7B-sized layer: a random
W [4096, 4096] and a random positive-definite H with a spread spectrum (eigenvalues
log-uniform over three decades, random eigenvectors). Prints and writes relative output
errors ||(W - Ŵ)X||^2 / ||WX||^2, bits per weight and seconds.

    python scripts/aqlm_synthetic.py [--size 4096] [--epochs 3] [--out benchmarks/...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def synthetic_layer(size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(size, size, generator=gen) * 0.02
    Q, _ = torch.linalg.qr(torch.randn(size, size, generator=gen))
    spectrum = 10 ** (3 * torch.rand(size, generator=gen) - 3)
    H = (Q * spectrum) @ Q.t()
    return W, (H + H.t()) / 2


def main(argv=None) -> int:
    import torch

    from quant.formats.codebook_weight import CodebookWeight
    from quant.formats.int_weight import IntWeight
    from quant.methods.aqlm import AQLMConfig, Shape, quantize_layer
    from quant.methods.gptq import gptq
    from quant.stats import relative_output_error

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3,
                        help="aqlm rounds (3 fit the 5-minute bar on 2 CPU cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    W, H = synthetic_layer(args.size, args.seed)
    tick = time.time()
    g = gptq(W, H, bits=2, group_size=128, sym=False)
    gptq_weight = IntWeight.from_ints(g.q, g.zeros, g.scales, bits=2, group_size=128, sym=False)
    rows = [{"method": "gptq 2-bit g128", "seconds": round(time.time() - tick, 1),
             "bits_per_weight": round(gptq_weight.bits_per_weight, 4),
             "rel_output_error": relative_output_error(W, gptq_weight.dequantize(), H)}]
    print(rows[-1], flush=True)

    tick = time.time()
    result = quantize_layer(W, H, Shape(1, 16, 8), AQLMConfig(max_epochs=args.epochs))
    aqlm_weight = CodebookWeight.from_parts(result["codes"], result["books"], result["scales"])
    rows.append({"method": "aqlm 1x16 g8", "seconds": round(time.time() - tick, 1),
                 "epochs": result["epochs"],
                 "bits_per_weight": round(aqlm_weight.bits_per_weight, 4),
                 "rel_output_error": relative_output_error(W, aqlm_weight.dequantize(), H)})
    print(rows[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "layer": f"{args.size}x{args.size}, seed {args.seed}", "machine": platform.processor()
            or platform.machine(), "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
