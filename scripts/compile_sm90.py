"""Compile every Triton kernel variant for an H100 (sm_90) without a GPU and report each
one's shared memory; exits 1 if any variant fails to compile or exceeds the limit.

    python scripts/compile_sm90.py [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

SM90_SHARED_LIMIT = 232448  # bytes of shared memory per block on an H100


def variants():
    """(kernel name, kernel, signature, constexprs, options) for every compiled variant."""
    import triton.language as tl

    from quant.kernels import tuning
    from quant.kernels.int_dequant import _int_dequant_kernel
    from quant.kernels.int_matmul import _int_matmul_kernel

    dtypes = {"fp16": tl.float16, "bf16": tl.bfloat16}
    formats = [(bits, group, g_idx) for bits in (2, 3, 4, 5, 6, 8)
               for group, g_idx in ((128, False), (32, False), (128, True))]
    configs = {regime: tuning.fit_block_k(tile, 128)
               for (fmt, regime), (_, tile) in tuning.DEFAULTS.items() if fmt == "int"}
    for (bits, group, g_idx), (dname, dtype), (cname, cfg) in itertools.product(
            formats, dtypes.items(), configs.items()):
        cfg = tuning.fit_block_k(cfg, group)
        split = 2 if cname == "gemv" else 1
        signature = {"x_ptr": f"*{dname}", "qweight_ptr": "*i32", "qzeros_ptr": "*i32",
                     "scales_ptr": "*fp16", "g_idx_ptr": "*i32", **split_outputs(dname),
                     "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                     "stride_om": "i32", "stride_split": "i32"}
        constexprs = {"BITS": bits, "GROUP_SIZE": group, "HAS_G_IDX": g_idx,
                      "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                      "SPLIT_K": split, "GROUP_M": cfg.group_m, "DOT_DTYPE": dtype}
        yield (f"int_matmul/{cname}/b{bits}/g{group}{'/g_idx' if g_idx else ''}/{dname}",
               _int_matmul_kernel, signature, constexprs,
               {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    dq = tuning.DEQUANT_TILE
    for (bits, group, g_idx), dname in itertools.product(formats, dtypes):
        signature = {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
                     "g_idx_ptr": "*i32", "out_ptr": f"*{dname}", "N": "i32", "K": "i32"}
        constexprs = {"BITS": bits, "GROUP_SIZE": group, "HAS_G_IDX": g_idx,
                      "BLOCK_N": dq.block_n, "BLOCK_K": min(dq.block_k, group)}
        yield (f"int_dequant/b{bits}/g{group}{'/g_idx' if g_idx else ''}/{dname}",
               _int_dequant_kernel, signature, constexprs,
               {"num_warps": dq.num_warps, "num_stages": dq.num_stages})
    yield from codebook_variants(dtypes)


def codebook_variants(dtypes):
    import dataclasses

    from quant.kernels import tuning
    from quant.kernels.codebook_matmul import (_codebook_dequant_kernel, _codebook_gemv_kernel,
                                               _codebook_matmul_kernel, code_layout,
                                               shape_constexprs)

    defaults = {regime: tile for (fmt, regime), (_, tile) in tuning.DEFAULTS.items()
                if fmt == "codebook"}
    tiles = {  # name: (kernel, tile, split): decode split, the batch-16 and batch-64 tiles
        "gemv": (_codebook_gemv_kernel, defaults["gemv"], 2),
        "fused_m16": (_codebook_matmul_kernel, defaults["batch"], 2),
        "fused_m64": (_codebook_matmul_kernel,
                      dataclasses.replace(defaults["batch"], block_m=64), 1),
        "gemm": (_codebook_dequant_kernel, defaults["gemm"], 1),
    }
    # (M, B, g): the paper's, --bits 2's on the demo (g4, wide g3), others
    shapes = [(1, 16, 8), (2, 8, 8), (1, 8, 4), (1, 8, 3), (4, 8, 16), (2, 8, 6)]
    for (m, nbits, g), (dname, dtype), (name, (kernel, tile, split)) in itertools.product(
            shapes, dtypes.items(), tiles.items()):
        code_bits, word_bits = code_layout(m, nbits)
        codes = f"*i{word_bits or code_bits}"
        weight = {"codes_ptr": codes, "books_ptr": "*fp16", "scales_ptr": "*fp16"}
        constexprs = {**shape_constexprs(m, nbits, g), "BLOCK_N": tile.block_n,
                      "BLOCK_J": tile.block_k}
        if name == "gemm":
            signature = {**weight, "out_ptr": f"*{dname}", "N": "i32", "J": "i32"}
        else:
            signature = {"x_ptr": f"*{dname}", **weight, **split_outputs(dname), "M": "i32",
                         "N": "i32", "J": "i32", "stride_xm": "i32", "stride_om": "i32",
                         "stride_split": "i32"}
            constexprs["SPLIT_J"] = split
        if kernel is _codebook_matmul_kernel:
            constexprs.update(BLOCK_M=tile.block_m, DOT_DTYPE=dtype)
        yield (f"codebook_{name}/{m}x{nbits}/g{g}/{dname}", kernel, signature, constexprs,
               {"num_warps": tile.num_warps, "num_stages": 1})


def split_outputs(dname: str) -> dict:
    """The output arguments of a kernel whose reduction may be split (kernels/splits.py)."""
    return {"out_ptr": f"*{dname}", "partials_ptr": "*fp32", "counters_ptr": "*i32"}


def launch_hints(kernel, signature) -> dict:
    """The divisibility a launch on a GPU gives the compiler for Llama shapes: torch's
    allocations are 16-byte aligned and every size but the row count M is a multiple of
    16, so compile with the same facts (loads vectorise on them)."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
            for name in signature if name != "M"}


def compile_one(index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kernel, signature, constexprs, options = list(variants())[index]
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs, attrs=launch_hints(kernel, signature))
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        return {"kernel": name, "shared": compiled.metadata.shared,
                "ok": compiled.metadata.shared <= SM90_SHARED_LIMIT}
    except Exception as exc:  # report every failure, not just the first
        return {"kernel": name, "error": str(exc).splitlines()[0][:300], "ok": False}


def compile_all() -> list[dict]:
    count = len(list(variants()))
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=get_context("spawn")) as pool:
        return list(pool.map(compile_one, range(count)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = compile_all()
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['kernel']:<48} "
                  f"{r.get('shared', '-'):>7} {r.get('error', '')}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
