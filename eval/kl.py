"""KL divergence of a model's next-token distribution from a reference (fp) model's, on the
same windows, streamed: one batch of both models' logits lives at a time, never the set's."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from quant.errors import ModelError


def kl_stats(model, reference, windows: torch.Tensor, batch_size: int = 4,
             progress: bool = True, desc: str = "kl") -> dict:
    """Per-token KL(reference || model) over windows [n, seqlen] (every position that
    predicts a next token): its mean and 99th percentile, how often both models' top-1
    tokens agree, and both perplexities on the same tokens."""
    device = next(model.parameters()).device
    kls, agree, nll, nll_reference = [], 0, 0.0, 0.0
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch",
                          disable=not progress):
            batch = batch.to(device)
            targets = batch[:, 1:]                                    # [b, t]
            logp_ref = _log_probs(reference, batch)                    # [b, t, vocab]
            logp = _log_probs(model, batch)
            if logp.shape != logp_ref.shape:
                raise ModelError(f"the models' vocabularies differ ({logp.shape[-1]} vs "
                                 f"{logp_ref.shape[-1]} logits); --reference must be the "
                                 "fp model the checkpoint was quantized from")
            kls.append((logp_ref.exp() * (logp_ref - logp)).sum(-1).flatten().cpu())
            agree += (logp.argmax(-1) == logp_ref.argmax(-1)).sum().item()
            nll -= logp.gather(-1, targets[..., None]).sum().item()
            nll_reference -= logp_ref.gather(-1, targets[..., None]).sum().item()
            del logp, logp_ref
    per_token = torch.cat(kls).double()
    tokens = per_token.numel()
    return {"tokens": tokens, "kl_mean": per_token.mean().item(),
            "kl_p99": torch.quantile(per_token, 0.99).item(),
            "top1_agreement": agree / tokens, "ppl": math.exp(nll / tokens),
            "ppl_reference": math.exp(nll_reference / tokens)}


def _log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """log-softmax of the logits at every position but the last, in fp32."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)
