"""The text `quant fits` prints (its --json prints the same answer as data)."""

from __future__ import annotations

MIB = 2**20
GIB = 2**30


def render(answer: dict) -> str:
    job = answer["job"]
    budget = answer["budget_bytes"]
    where = f"{answer['gpu']} ({budget / GIB:.1f} GiB)" if answer["gpu"] else (
        f"{budget / GIB:.1f} GiB" if budget else "no GPU given (--gpu or --vram)")
    what = f"train {job['train']}" if job.get("train") else job["workload"]
    lines = [f"{answer['model']} on {where}: {what}, runtime {job['runtime']}, context "
             f"{job['context']}" + (f" + {job['new_tokens']} new" if job["new_tokens"] else "")
             + f", batch {job['batch']}"]
    lines += [f"warning: {w}" for w in answer["warnings"]]
    rows = answer["results"]
    if len(rows) == 1 and "error" not in rows[0]:
        lines += one(rows[0], budget)
    else:
        lines += table(rows, budget)
    return "\n".join(lines)


def one(r: dict, budget) -> list[str]:
    lines = [f"{r['scheme']}: weights {r['weights_how']}; {r['dtype']}"]
    for key, value in r["gpu_poor"].items():
        lines.append(f"  {key:<26} {value:>10,} MiB")
    if budget is not None:
        verdict = "fits" if r["fits"] else "does not fit"
        lines.append(f"{verdict}: {abs(r['headroom_bytes']) / GIB:.2f} GiB "
                     f"{'to spare' if r['fits'] else 'short'}; largest context "
                     f"{r['largest_context']:,} tokens, largest batch {r['largest_batch']}")
    if "decode" in r:
        lines.append(f"decode: ~{r['decode']['tokens_per_s']} tokens/s ({r['decode']['how']})")
    for q in r.get("quality", []):
        lines.append(f"quality (eval.json): perplexity {q['ppl']:.3f} on {q['dataset']} "
                     f"(seqlen {q['seqlen']})")
    lines.append(f"overhead: {r['overhead_how']}")
    return lines


def table(rows: list[dict], budget) -> list[str]:
    head = f"  {'scheme':<14} {'weights':>10} {'total':>10} {'fits':>5} {'max ctx':>9} " \
           f"{'max batch':>9} {'tok/s':>7}  weights counted"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['scheme']:<14} {'-':>10} {'-':>10} {'-':>5}  ({r['error']})")
            continue
        mark = "*" if r.get("best") else " "
        fits = "-" if budget is None else ("yes" if r["fits"] else "no")
        lines.append(
            f"{mark} {r['scheme']:<14} {r['breakdown']['weights'] / MIB:>7,.0f} MiB "
            f"{r['total_bytes'] / MIB:>6,.0f} MiB {fits:>5} "
            f"{r.get('largest_context', '-'):>9} {r.get('largest_batch', '-'):>9} "
            f"{r.get('decode', {}).get('tokens_per_s', '-'):>7}  "
            f"{'exact' if r['weights_exact'] else 'estimate'}")
    if any(r.get("best") for r in rows):
        lines.append("* the most bits that fit; quality figures: quant eval on a checkpoint")
    return lines
