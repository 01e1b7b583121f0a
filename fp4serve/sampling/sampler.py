"""The batched sampler: one token per logits row, on the logits' device.

It follows vLLM v1's order of operations on float32 logits: raw logprobs (vLLM's default logprobs mode) →
allowed ids, bad words, min_tokens and logit bias → repetition (prompt + output tokens), presence and frequency
(output tokens) penalties → greedy argmax when temperature is 0, else temperature → min_p → top-k → top-p → a
draw by the exponential race (argmax of p/q with q ~ Exp(1), equivalent to a categorical draw). Each seeded request
draws its noise from its own `torch.Generator` over one full vocabulary row, so its tokens do not depend on which
other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fp4serve.sampling.params import FALLBACKS, SamplingParams


@dataclass(frozen=True)
class SamplerOutput:
    """Tokens of one sampling step; the logprob fields are None when no request asked for logprobs."""

    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None = None  # [R] raw logprob of the sampled token
    ranks: torch.Tensor | None = None  # [R] rank of the sampled token, 1 = most likely
    top_token_ids: torch.Tensor | None = None  # [R, K] K = largest `logprobs` in the batch
    top_logprobs: torch.Tensor | None = None  # [R, K]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one seeded request; keep it for the request's lifetime so its draws continue."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (1 << 64))
    return generator


def _resolved(p: SamplingParams, name: str) -> float | int:
    value = getattr(p, name)
    return FALLBACKS[name] if value is None else value


def _padded_ids(rows: Sequence[Sequence[int] | torch.Tensor], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out.to(device, non_blocking=True)


class Sampler:
    """Batched sampling on the logits' device. `eos_token_ids` are banned while a request is under min_tokens."""

    def __init__(self, eos_token_ids: Sequence[int] = (), *, vocab_size: int | None = None) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        # ids >= vocab_size (padded embedding rows) are never sampled when given
        self.vocab_size = vocab_size

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int] | torch.Tensor],
        output_ids: Sequence[Sequence[int] | torch.Tensor],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> SamplerOutput:
        """Sample one token per row of `logits` [R, V] (row i belongs to params[i], prompt_ids[i], ...)."""
        num_rows, vocab = logits.shape
        assert len(params) == len(prompt_ids) == len(output_ids) == num_rows
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        x = self.process_logits(logits, params, prompt_ids, output_ids)
        token_ids = x.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=x.device)
            temperature = torch.tensor([_resolved(params[i], "temperature") for i in random_rows], device=x.device)
            xr = x.index_select(0, rows) / temperature.unsqueeze(1)
            xr = _apply_min_p(xr, [_resolved(params[i], "min_p") for i in random_rows])
            xr = _apply_top_k_top_p(
                xr,
                [_resolved(params[i], "top_k") for i in random_rows],
                [_resolved(params[i], "top_p") for i in random_rows],
            )
            row_generators = [generators[i] if generators else None for i in random_rows]
            token_ids[rows] = _exponential_race(torch.softmax(xr, dim=-1), row_generators)

        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_ids)
        sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))  # [R, 1]
        ranks = (raw_logprobs > sampled).sum(dim=-1) + 1
        k = min(max(p.logprobs or 0 for p in params), vocab)
        top = raw_logprobs.topk(k, dim=-1) if k > 0 else None
        return SamplerOutput(
            token_ids=token_ids,
            logprobs=sampled.squeeze(1),
            ranks=ranks,
            top_token_ids=top.indices if top is not None else token_ids.new_empty((num_rows, 0)),
            top_logprobs=top.values if top is not None else sampled.new_empty((num_rows, 0)),
        )

    def process_logits(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int] | torch.Tensor],
        output_ids: Sequence[Sequence[int] | torch.Tensor],
    ) -> torch.Tensor:
        """A float32 copy of `logits` with token constraints and penalties applied (what greedy takes argmax of)."""
        x = logits.float().clone()
        self._apply_constraints(x, params, output_ids)
        self._apply_penalties(x, params, prompt_ids, output_ids)
        return x

    def _apply_constraints(
        self, x: torch.Tensor, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int] | torch.Tensor]
    ) -> None:
        vocab = x.shape[1]
        if self.vocab_size is not None and self.vocab_size < vocab:
            x[:, self.vocab_size :] = float("-inf")
        for i, p in enumerate(params):
            banned: list[int] = []
            if p.allowed_token_ids is not None:
                keep = torch.zeros(vocab, dtype=torch.bool, device=x.device)
                keep[torch.tensor([t for t in p.allowed_token_ids if 0 <= t < vocab], device=x.device)] = True
                x[i].masked_fill_(~keep, float("-inf"))
            if p.bad_words_token_ids:
                history = [int(t) for t in output_ids[i][-max(len(w) for w in p.bad_words_token_ids) :]]
                for word in p.bad_words_token_ids:
                    prefix = list(word[:-1])
                    if not prefix or history[len(history) - len(prefix) :] == prefix:
                        banned.append(word[-1])
            if p.min_tokens and len(output_ids[i]) < p.min_tokens:
                banned += [*self.eos_token_ids, *p.stop_token_ids]
            bias = [(t, b) for t, b in p.logit_bias if 0 <= t < vocab]
            if bias:
                ids = torch.tensor([t for t, _ in bias], device=x.device)
                x[i].index_add_(0, ids, torch.tensor([b for _, b in bias], device=x.device))
            banned = [t for t in banned if 0 <= t < vocab]
            if banned:
                x[i, torch.tensor(banned, device=x.device)] = float("-inf")

    def _apply_penalties(
        self,
        x: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int] | torch.Tensor],
        output_ids: Sequence[Sequence[int] | torch.Tensor],
    ) -> None:
        vocab = x.shape[1]
        rows = [
            i
            for i, p in enumerate(params)
            if p.presence_penalty or p.frequency_penalty or _resolved(p, "repetition_penalty") != 1.0
        ]
        if not rows:
            return
        index = torch.tensor(rows, device=x.device)
        sub = x.index_select(0, index)  # [r, V]
        outputs = _padded_ids([output_ids[i] for i in rows], vocab, x.device)
        counts = torch.zeros(len(rows), vocab + 1, device=x.device)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=counts.dtype))
        counts = counts[:, :vocab]
        rep = torch.tensor([float(_resolved(params[i], "repetition_penalty")) for i in rows], device=x.device)
        if bool((rep != 1.0).any()):
            prompts = _padded_ids([prompt_ids[i] if rep[j] != 1.0 else () for j, i in enumerate(rows)], vocab, x.device)
            seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=x.device)
            seen.scatter_(1, prompts, True)
            seen = seen[:, :vocab] | (counts > 0)
            penalty = rep.unsqueeze(1)
            sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
        frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=x.device).unsqueeze(1)
        presence = torch.tensor([params[i].presence_penalty for i in rows], device=x.device).unsqueeze(1)
        sub = sub - frequency * counts - presence * (counts > 0).to(sub.dtype)
        x.index_copy_(0, index, sub)


def _apply_min_p(x: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if not any(m > 0 for m in min_p):
        return x
    probs = torch.softmax(x, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=x.device).unsqueeze(1)
    return x.masked_fill(probs < threshold, float("-inf"))


def _apply_top_k_top_p(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept), then the smallest head with mass >= p."""
    vocab = x.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if any(k < vocab for k in ks):
        k_max = max(k for k in ks if k < vocab)
        kth = x.topk(k_max, dim=-1).values  # [r, k_max]
        k_index = torch.tensor([min(k, k_max) - 1 for k in ks], device=x.device).unsqueeze(1)
        threshold = kth.gather(1, k_index)
        threshold[torch.tensor([k == vocab for k in ks], device=x.device)] = float("-inf")
        x = x.masked_fill(x < threshold, float("-inf"))
    if not any(p < 1.0 for p in top_p):
        return x
    if all(k < vocab for k in ks):
        # every row kept only its top-k (plus ties): sorting the kept head suffices, not the whole vocabulary
        head = int((x > float("-inf")).sum(dim=-1).max())
        sorted_x, order = x.topk(head, dim=-1)
    else:
        sorted_x, order = x.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # rows without top-p get a threshold no cumulative sum reaches, even with rounding
    p = torch.tensor([q if q < 1.0 else 2.0 for q in top_p], device=x.device).unsqueeze(1)
    drop = mass_before >= p
    drop[:, 0] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x)


def _exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Categorical draw per row as argmax(p / q), q ~ Exp(1); seeded rows use their own generator."""
    q = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise = torch.empty((len(unseeded), probs.shape[1]), device=probs.device).exponential_()
        q[torch.tensor(unseeded, device=probs.device)] = noise
    for i, generator in enumerate(generators):
        if generator is not None:
            q[i].exponential_(generator=generator)
    return (probs / q).argmax(dim=-1)
