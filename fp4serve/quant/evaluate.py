"""Quality of quantized models against their reference: perplexity, KL(ref || quant) and top-1 agreement.

The text is cut into non-overlapping windows exactly like calibration data (`calib_data.token_windows`), and every
window is scored as an independent sequence from an empty cache. Inside a window of L tokens, positions 0..L-2 each
predict the next token; those L-1 positions per window are what all three metrics average over:
- perplexity: exp(mean negative log-likelihood of the true next token), for the reference and every candidate;
- KL(ref || quant) = sum_v p_ref(v) (log p_ref(v) - log p_quant(v)), the mean over positions (in nats);
- top-1 agreement: the fraction of positions where both models' argmax agree.
All models run window by window in lockstep, so the reference is computed once however many candidates there are,
and full-vocabulary log-probabilities are materialized only for `rows_per_chunk` positions at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fp4serve.model.qwen3_5 import Qwen35ForCausalLM
from fp4serve.quant.layerwise import CACHE_BLOCK_SIZE, prefill_batch


@dataclass(frozen=True)
class ModelScore:
    """One model's scores; kl/top1 are None for the reference itself."""

    name: str
    perplexity: float
    nll: float  # mean negative log-likelihood (nats/token)
    kl: float | None = None
    top1_agreement: float | None = None


@dataclass(frozen=True)
class EvalResult:
    reference: ModelScore
    candidates: tuple[ModelScore, ...]
    windows: int
    seq_len: int
    tokens_scored: int

    def to_dict(self) -> dict:
        return {
            "windows": self.windows,
            "seq_len": self.seq_len,
            "tokens_scored": self.tokens_scored,
            "reference": asdict(self.reference),
            "candidates": [asdict(c) for c in self.candidates],
        }

    def table(self) -> str:
        rows = [("model", "perplexity", "KL(ref||q)", "top-1 agree")]
        for score in (self.reference, *self.candidates):
            kl = "-" if score.kl is None else f"{score.kl:.5f}"
            top1 = "-" if score.top1_agreement is None else f"{100 * score.top1_agreement:.2f}%"
            rows.append((score.name, f"{score.perplexity:.3f}", kl, top1))
        width = max(len(r[0]) for r in rows)
        lines = [f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}  {r[3]:>12}" for r in rows]
        lines.append(f"{self.windows} windows x {self.seq_len} tokens, {self.tokens_scored} predictions scored")
        return "\n".join(lines)


@dataclass
class _Totals:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0


@torch.no_grad()
def _hidden(model: Qwen35ForCausalLM, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Final hidden states [B * L, hidden] of windows ids [B, L], each a fresh sequence."""
    count, seq_len = ids.shape
    batch = prefill_batch(count, seq_len, device, input_ids=ids)
    blocks = count * math.ceil(seq_len / CACHE_BLOCK_SIZE)
    cache = model.allocate_cache(blocks, CACHE_BLOCK_SIZE, count, device, dtype)
    return model(batch, cache)


@torch.no_grad()
def evaluate_models(
    reference: tuple[str, Qwen35ForCausalLM],
    candidates: Sequence[tuple[str, Qwen35ForCausalLM]],
    windows: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    windows_per_batch: int = 4,
    rows_per_chunk: int = 256,
    progress: bool = True,
) -> EvalResult:
    """Score `candidates` against `reference` on token windows [W, L] (see the module docstring)."""
    device = torch.device(device)
    num_windows, seq_len = windows.shape
    ref_totals = _Totals()
    totals = [_Totals() for _ in candidates]
    scored = 0
    bar = tqdm(total=num_windows, desc="Evaluating", unit="window", disable=not progress)
    for start in range(0, num_windows, windows_per_batch):
        ids = windows[start : start + windows_per_batch]
        count = ids.shape[0]
        # predicting rows: every position except the last of each window; targets are the next tokens
        rows = torch.arange(count * seq_len, device=device).view(count, seq_len)[:, :-1].reshape(-1)
        targets = ids[:, 1:].reshape(-1).to(device)
        ref_hidden = _hidden(reference[1], ids, device, dtype)[rows]
        cand_hidden = [_hidden(model, ids, device, dtype)[rows] for _, model in candidates]
        for c0 in range(0, rows.numel(), rows_per_chunk):
            sl = slice(c0, c0 + rows_per_chunk)
            tgt = targets[sl]
            ref_logp = F.log_softmax(reference[1].compute_logits(ref_hidden[sl]).float(), dim=-1)  # [R, V]
            ref_nll = -ref_logp.gather(1, tgt[:, None]).squeeze(1)
            ref_totals.nll += float(ref_nll.double().sum())
            ref_p = ref_logp.exp()
            ref_top = ref_logp.argmax(-1)
            for (_, model), hidden, tot in zip(candidates, cand_hidden, totals, strict=True):
                logp = F.log_softmax(model.compute_logits(hidden[sl]).float(), dim=-1)
                tot.nll += float((-logp.gather(1, tgt[:, None])).double().sum())
                tot.kl += float((ref_p * (ref_logp - logp)).sum(-1).double().sum())
                tot.agree += int((logp.argmax(-1) == ref_top).sum())
        scored += rows.numel()
        bar.update(count)
    bar.close()

    def score(name: str, t: _Totals, with_ref: bool) -> ModelScore:
        nll = t.nll / scored
        if not with_ref:
            return ModelScore(name, math.exp(nll), nll)
        return ModelScore(name, math.exp(nll), nll, t.kl / scored, t.agree / scored)

    return EvalResult(
        reference=score(reference[0], ref_totals, False),
        candidates=tuple(score(n, t, True) for (n, _), t in zip(candidates, totals, strict=True)),
        windows=num_windows,
        seq_len=seq_len,
        tokens_scored=scored,
    )
