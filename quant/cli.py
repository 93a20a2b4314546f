"""Command line: `quantize` (the main job) and `quant` (quantize, plan, eval, info, export).

Thin by design: arguments -> config dataclasses -> one library call. Library errors
(`LowbitError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import typing
from pathlib import Path

from quant.errors import LowbitError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too by default)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ---- quantize ----------------------------------------------------------------------------

def _method_fields():
    """(type, help) of every option of every registered method: the first method's type,
    and the help texts of all methods that differ, joined (--bits means one thing to the
    integer methods and another to aqlm)."""
    from quant.methods import METHODS

    fields = {}
    for cls in METHODS.values():
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            help_text = f.metadata.get("help", "")
            if f.name in fields:
                kind, known = fields[f.name]
                if help_text and help_text not in known:
                    fields[f.name] = (kind, f"{known}; {help_text}" if known else help_text)
                continue
            kind = hints[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            fields[f.name] = (args[0] if args else kind, help_text)
    return fields


def add_method_args(p: argparse.ArgumentParser) -> None:
    """A flag for every option of every registered method (--bits, --group-size, ...)."""
    group = p.add_argument_group("method options (defaults depend on the method)")
    for name, (kind, help_text) in _method_fields().items():
        flag = "--" + name.replace("_", "-")
        help_text = help_text.replace("%", "%%")  # prose, not an argparse %(default)s template
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def method_options(args) -> dict:
    """The method options given on the command line (the method's defaults fill the rest)."""
    return {name: getattr(args, name) for name in _method_fields()
            if getattr(args, name) is not None}


def quantize_defaults() -> dict:
    """The values of quantize's job options when neither the command line nor a recipe
    sets them (their argparse defaults are None, so that a given option is recognisable)."""
    from quant.data import ALL_DEMO, CalibConfig

    return {"method": "rtn", "calib": CalibConfig.dataset, "seqlen": CalibConfig.seqlen,
            "seed": CalibConfig.seed, "eval_ppl": ALL_DEMO}


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    from quant.data import known_sets
    from quant.methods import METHODS
    from quant.pipeline import MATMUL_DTYPES

    defaults = quantize_defaults()
    p.add_argument("model", nargs="?", help="demo alias (default smollm2-135m), local "
                   "directory, or hub id (when online)")
    p.add_argument("--recipe", metavar="NAME", help="run a complete job from recipes/ (quant "
                   "recipes lists them) or a .toml file; options given here override it")
    p.add_argument("--method", help=f"one of {', '.join(sorted(METHODS))} "
                   f"(default {defaults['method']})")
    add_method_args(p)
    calib = p.add_argument_group("calibration")
    calib.add_argument("--calib", help=f"{' | '.join(known_sets())} | self:N (N sequences the "
                       "fp model samples) | PATH (.txt/.jsonl/.parquet) | a datasets name as "
                       "NAME:CONFIG:SPLIT (NAME::SPLIT, NAME:CONFIG: train) | a dataset folder "
                       f"(save_to_disk or data files); default {defaults['calib']}: every "
                       "demo domain in equal parts")
    calib.add_argument("--nsamples", type=int, default=None,
                       help="calibration windows (default: the method's, 128 for most)")
    calib.add_argument("--seqlen", type=int, help=f"tokens per window (default "
                       f"{defaults['seqlen']})")
    calib.add_argument("--seed", type=int, help=f"default {defaults['seed']}")
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint directory (default ./MODEL-METHOD-BITSbit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--matmul-dtype", default="auto", choices=["auto", *MATMUL_DTYPES],
                   help="CPU runs: dtype of the model's matmuls while calibrating (weights "
                        "and statistics stay fp32); auto: bfloat16 where the CPU has native "
                        "bf16 and the method allows it (aqlm), else float32")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading a pickle (.bin) source checkpoint")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the perplexity of the fp and quantized models")
    p.add_argument("--eval-ppl", metavar="DATASET",
                   help="where the run's perplexity is measured: all-demo (the default: every "
                        "demo domain's held-out split, with the geometric mean of the ratios "
                        "to fp), or one data set as for --calib")


JOB_SETTINGS = ("model", "method", "calib", "nsamples", "seqlen", "seed", "eval_ppl")


def job_settings(args) -> tuple[dict, dict, dict | None]:
    """(settings, method options, recipe record): the command line over the recipe over
    the defaults. A recipe's method options apply only to its own method."""
    from quant.recipes import find_recipe

    given = {k: getattr(args, k) for k in JOB_SETTINGS if getattr(args, k) is not None}
    options = method_options(args)
    if not args.recipe:
        return {**quantize_defaults(), **given}, options, None
    recipe = find_recipe(args.recipe)
    settings = {**quantize_defaults(), **recipe.settings(), **given}
    own = recipe.options if settings["method"] == recipe.method else {}
    overrides = {**given, **options}
    return settings, {**own, **options}, {"name": recipe.name, "file": recipe.path,
                                           "overrides": overrides}


def run_quantize(args) -> int:
    from quant.data import CalibConfig, check_eval_name
    from quant.eval.evaluate import domain_table, evaluate_ppls, expand_datasets, versus_fp
    from quant.eval.report import write_report
    from quant.info import describe, distill_line
    from quant.methods import make_method
    from quant.pipeline import QuantizeJob, quantize, resolve_device

    settings, options, recipe = job_settings(args)
    for dataset in expand_datasets(settings["eval_ppl"]):
        check_eval_name(dataset)  # before the run, not after it
    caution = make_method(settings["method"], **options).caution()  # bad options fail first
    if caution:
        print(f"note: {caution}", file=sys.stderr)
    job = QuantizeJob(
        method=settings["method"], method_options=options, model=settings.get("model"),
        calib=CalibConfig(settings["calib"], settings.get("nsamples"), settings["seqlen"],
                          settings["seed"]), out=args.out,
        overwrite=args.overwrite, resume=args.resume, device=args.device,
        matmul_dtype=args.matmul_dtype, allow_pickle=args.allow_pickle, recipe=recipe)
    out = quantize(job)
    summary = describe(out)
    print(f"checkpoint: {out}  ({summary['quantized_layers']} layers, "
          f"{summary['quantized_bits_per_weight']:.3f} bits/weight, "
          f"{summary['bytes_on_disk'] / 2**20:.1f} MiB, "
          f"{json.loads((out / 'quant_report.json').read_text())['quantize_seconds']:.0f} s)")
    schemes = collections.Counter(layer["scheme"] for layer in summary["layers"])
    print("layer formats: " + ", ".join(f"{n} x {s}" for s, n in schemes.most_common()))
    if summary["distill"]:
        print(distill_line(summary["distill"]))
    if not args.no_eval:
        device = resolve_device(args.device)
        datasets = expand_datasets(settings["eval_ppl"])
        comparison = versus_fp(out, evaluate_ppls(str(out), datasets, device=device),
                               settings.get("model"), device=device)
        print(f"perplexity (seqlen {comparison['seqlen']}, held-out splits; fp measured once "
              "per model and data, then cached):")
        print(domain_table(comparison["rows"], comparison["geomean_ratio"]
                           if len(datasets) > 1 else None))
        report, notes = write_report([out], out)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"report: {report}")
    print(f"load it with: quant.load({str(out)!r})")
    return 0


# ---- eval / info -------------------------------------------------------------------------

def add_eval_args(p):
    from quant.eval.memory import TRAIN_MODES, WORKLOADS

    p.add_argument("model", help="checkpoint directory, local model or demo alias")
    p.add_argument("--ppl", "--dataset", dest="ppl", default="wiki-demo",
                   help="a data set as for --calib (a datasets name without a split: its "
                        "test, else validation split), or all-demo: every demo domain's "
                        "held-out split, a table, and (for a checkpoint whose fp model is "
                        "here) the geometric mean of the ratios to fp")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--output", type=Path, help="also write the JSON result here")
    p.add_argument("--allow-pickle", action="store_true")
    kl = p.add_argument_group("KL divergence (--kl: against the fp model instead of perplexity)")
    kl.add_argument("--kl", action="store_true",
                    help="per-token KL(fp || model) on the --dataset windows: mean, 99th "
                         "percentile, top-1 agreement, and both perplexities")
    kl.add_argument("--reference", metavar="MODEL",
                    help="the fp model to compare with (default: the one the checkpoint was "
                         "quantized from, as recorded in it)")
    kl.add_argument("--windows", type=int, metavar="N",
                    help="only the first N windows of each split (default all)")
    mem = p.add_argument_group("memory (--memory: measure instead of perplexity)")
    mem.add_argument("--memory", action="store_true",
                     help="measure the peak memory of one job, split into weights, KV cache, "
                          "activations, gradients, optimizer and overhead, with the fits "
                          "calculator's prediction beside it")
    mem.add_argument("--context", type=int, default=2048, help="prompt tokens per sequence")
    mem.add_argument("--batch", type=int, default=1, help="sequences")
    mem.add_argument("--new-tokens", type=int, default=16, help="greedy decode steps")
    mem.add_argument("--runtime", default="hf", help="hf (transformers)")
    mem.add_argument("--workload", default="generate", choices=WORKLOADS,
                     help="generate: prefill with last-token logits, then decode; forward: "
                          "every position's logits, no cache (perplexity)")
    mem.add_argument("--train", choices=TRAIN_MODES, help="one AdamW step instead: LoRA "
                     "(peft) on an fp model, QLoRA on a checkpoint, or full fine-tuning")
    mem.add_argument("--gradient-checkpointing", action="store_true")
    mem.add_argument("--lora-rank", type=int, default=8)


def run_eval(args) -> int:
    from quant.eval.evaluate import (domain_table, evaluate_kl, evaluate_memory,
                                     evaluate_ppls, expand_datasets, fp_source, kl_table,
                                     locate, versus_fp)
    from quant.eval.memory import MemoryJob
    from quant.pipeline import resolve_device

    if args.memory:
        job = MemoryJob(context=args.context, batch=args.batch, new_tokens=args.new_tokens,
                        runtime=args.runtime, workload=args.workload, train=args.train,
                        gradient_checkpointing=args.gradient_checkpointing,
                        lora_rank=args.lora_rank)
        result = evaluate_memory(args.model, job, resolve_device(args.device),
                                 args.allow_pickle)
        return _print_result(result, args.output)
    if args.seqlen < 2 or args.batch_size < 1:
        raise LowbitError("--seqlen must be at least 2 and --batch-size at least 1")
    if args.windows is not None and (args.windows < 1 or not args.kl):
        raise LowbitError("--windows N (N >= 1) goes with --kl")
    datasets = expand_datasets(args.ppl)
    device = resolve_device(args.device)
    if args.kl:
        results = evaluate_kl(args.model, datasets, args.reference, args.seqlen, device,
                              args.batch_size, args.windows, allow_pickle=args.allow_pickle)
        print(kl_table(results), file=sys.stderr)
        return _print_result(results[0] if len(results) == 1 else {"results": results},
                             args.output)
    results = evaluate_ppls(args.model, datasets, args.seqlen, device, args.batch_size,
                            allow_pickle=args.allow_pickle)
    if len(datasets) == 1:
        return _print_result(results[0], args.output)
    source, quantized = locate(args.model)
    baseline = fp_source(source) if quantized else None
    if baseline is None:
        if quantized:
            print("note: the fp model this checkpoint came from is not on this machine; "
                  "no ratios to fp", file=sys.stderr)
        column = "quantized" if quantized else "fp"
        print(domain_table([{"dataset": r["dataset"], column: r["ppl"]} for r in results]),
              file=sys.stderr)
        return _print_result({"results": results}, args.output)
    comparison = versus_fp(source, results, str(baseline), args.seqlen, device,
                           args.batch_size)
    print(domain_table(comparison["rows"], comparison["geomean_ratio"]), file=sys.stderr)
    return _print_result({"results": results, "comparison": comparison}, args.output)


def _print_result(result: dict, output: Path | None) -> int:
    text = json.dumps(result, indent=2)
    if output:
        output.write_text(text + "\n")
    print(text)
    return 0


def add_info_args(p):
    p.add_argument("directory", type=Path, help="lowbit checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_info(args) -> int:
    from quant.info import describe, render

    summary = describe(args.directory)
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 0


def add_plan_args(p):
    from quant.methods import METHODS

    p.add_argument("model", nargs="?", help="demo alias (default smollm2-135m), local model "
                   "directory, or a directory holding only config.json")
    p.add_argument("--method", default="rtn",
                   help=f"one of {', '.join(sorted(METHODS))} (default rtn)")
    add_method_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args) -> int:
    from quant import models
    from quant import plan as plans
    from quant.info import render
    from quant.methods import make_method

    method = make_method(args.method, **method_options(args))
    plan = plans.for_source(models.resolve(args.model, config_only=True), method)
    summary = {"model": args.model or "smollm2-135m", "method": args.method, **plan.summary()}
    print(json.dumps({**summary, "plan": plan.to_json()}, indent=2) if args.json
          else render(summary))
    return 0


def add_fits_args(p):
    from quant.eval import fits
    from quant.eval.memory import TRAIN_MODES, WORKLOADS
    from quant.eval.schemes import FOREIGN

    p.add_argument("model", nargs="?", help="known model name (quant fits --list), local "
                   "config.json or model directory, lowbit checkpoint, or hub id (online)")
    p.add_argument("--gpu", help="GPU name, e.g. 'RTX 4090', h100 (see --list)")
    p.add_argument("--vram", help="memory to fit in instead of --gpu: 24GB, 24GiB, 80")
    p.add_argument("--context", type=int, default=4096, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=0, help="generated tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences")
    p.add_argument("--quant", help="fp16 | bf16 | int8 | gptq:4g128[-act] | rtn:3g64 | "
                   "aqlm:1x16g8 | aqlm:2 | CHECKPOINT_DIR; estimates of other tools: "
                   f"{', '.join(FOREIGN)}; "
                   "default: a table of candidates")
    p.add_argument("--kv-dtype", default="auto", help="auto (the model's) | fp16 | fp8 | int8")
    p.add_argument("--runtime", default="hf", choices=fits.RUNTIMES,
                   help="hf (measured) | vllm | llama.cpp (estimates)")
    p.add_argument("--workload", default="generate", choices=WORKLOADS)
    p.add_argument("--attention", default="sdpa", choices=fits.ATTENTION)
    p.add_argument("--train", choices=TRAIN_MODES, help="one AdamW step of training instead")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--dtype", default="auto", help="auto (the model's 16-bit dtype) | fp16 | "
                   "bf16 | fp32")
    p.add_argument("--list", action="store_true", help="list the known models and GPUs")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


def run_fits(args) -> int:
    from quant import recipes
    from quant.eval import fits
    from quant.eval.fits_render import render

    if args.list:
        print("models: " + ", ".join(recipes.known_models()))
        print("GPUs: " + ", ".join(recipes.gpus()))
        return 0
    job = fits.FitsJob(model=args.model, gpu=args.gpu, vram=args.vram, context=args.context,
                       new_tokens=args.new_tokens, batch=args.batch, quant=args.quant,
                       kv_dtype=args.kv_dtype, runtime=args.runtime, workload=args.workload,
                       attention=args.attention, train=args.train,
                       gradient_checkpointing=args.gradient_checkpointing,
                       lora_rank=args.lora_rank, dtype=args.dtype)
    answer = fits.fits(job)
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 0


def add_report_args(p):
    p.add_argument("directories", type=Path, nargs="+", metavar="DIR",
                   help="lowbit checkpoints with eval results (quantize's, or quant eval's)")
    p.add_argument("--out", type=Path, help="report directory (default: the checkpoint for "
                   "one DIR, ./lowbit-report for several)")


def run_report(args) -> int:
    from quant.eval.report import write_report

    out = args.out or (args.directories[0] if len(args.directories) == 1
                       else Path("lowbit-report"))
    path, notes = write_report(args.directories, out)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report: {path}")
    return 0


def add_recipes_args(p):
    p.add_argument("--json", action="store_true", help="print the recipes as JSON")


def run_recipes(args) -> int:
    from quant.recipes import job_recipes

    recipes = job_recipes()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in recipes.values()], indent=2))
        return 0
    width = max(len(name) for name in recipes)
    for name, recipe in recipes.items():
        print(f"{name:<{width}}  {recipe.description}")
    print("\nrun one with: quantize --recipe NAME [MODEL] [options that override it]")
    return 0


def add_export_args(p):
    p.add_argument("directory", type=Path, help="lowbit checkpoint directory")
    p.add_argument("out", type=Path, help="directory to write")
    p.add_argument("--format", required=True, help="gptq")
    p.add_argument("--overwrite", action="store_true")


def run_export(args) -> int:
    from quant.export import export

    out = export(args.directory, args.format, args.out, args.overwrite)
    print(f"exported {args.directory} as {args.format} to {out}")
    return 0


# ---- entry points ------------------------------------------------------------------------

COMMANDS = {
    "quantize": (add_quantize_args, run_quantize, "quantize a model into a lowbit checkpoint"),
    "plan": (add_plan_args, run_plan, "each layer's format, bits and the checkpoint size, "
             "from the model's config alone"),
    "eval": (add_eval_args, run_eval, "perplexity or measured memory of a checkpoint or fp "
             "model (JSON)"),
    "fits": (add_fits_args, run_fits, "will a model fit a GPU: memory by part, the largest "
             "context and batch, decode speed"),
    "report": (add_report_args, run_report, "Markdown and plots of checkpoints' eval results "
               "(quality against bits, error per layer, memory)"),
    "info": (add_info_args, run_info, "per-layer formats, bits per weight and size"),
    "recipes": (add_recipes_args, run_recipes, "the shipped quantization recipes (quantize "
                "--recipe NAME)"),
    "export": (add_export_args, run_export, "rewrite a uniform checkpoint for another runtime"),
}


def _run(fn, args) -> int:
    try:
        return fn(args)
    except LowbitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted (an unfinished quantize run can be continued with --resume)",
              file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --nsamples or --seqlen, or use a machine with "
              "more memory", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            print("error: out of GPU memory; lower --nsamples or --seqlen, or use --device cpu",
                  file=sys.stderr)
            return EXIT_USAGE
        raise


def quantize_main(argv=None) -> int:
    parser = _Parser(prog="quantize", description=COMMANDS["quantize"][2])
    add_quantize_args(parser)
    return _run(run_quantize, parser.parse_args(argv))


def main(argv=None) -> int:
    parser = _Parser(prog="quant", description="lowbit: quantize, evaluate and inspect LLMs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return _run(COMMANDS[args.command][1], args)


if __name__ == "__main__":
    sys.exit(main())
