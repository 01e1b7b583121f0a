"""The batched sampler: one token per logits row, on the logits' device.

It follows vLLM v1's order of operations on float32 logits: raw logprobs (vLLM's default logprobs mode) →
allowed ids, bad words, min_tokens and logit bias → repetition (prompt + output tokens), presence and frequency
(output tokens) penalties → greedy argmax when temperature is 0, else temperature → top-k / min_p → top-p → a
draw by the exponential race (argmax of p/q with q ~ Exp(1), equivalent to a categorical draw).

Choices that keep it fast and reproducible: penalties touch only the ids a request has seen (gather/scatter, not
vocabulary-wide count tensors); when every sampled row uses top-k (Qwen's default), the filters and the draw run
on the sorted top-k head instead of sorting the vocabulary; every filter keeps logits tied with its last kept one,
so the kept set never depends on sort order; and each seeded request draws its noise from its own
`torch.Generator` over one full vocabulary row, so its tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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
    """[len(rows), longest] int64 on `device`, padded with `pad`; tensor rows stay where they are."""
    if rows and all(isinstance(r, torch.Tensor) for r in rows):
        tensors = [r.to(device=device, dtype=torch.long) for r in rows]
        if not any(len(t) for t in tensors):
            return torch.full((len(rows), 1), pad, dtype=torch.long, device=device)
        return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad)
    width = max((len(r) for r in rows), default=0)
    # numpy converts Python int lists several times faster than torch does row by row
    out = np.full((len(rows), max(width, 1)), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = row.cpu().numpy() if isinstance(row, torch.Tensor) else row
    return torch.from_numpy(out).to(device, non_blocking=True)


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
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        token_ids = x.argmax(dim=-1) if len(random_rows) < num_rows else None
        if random_rows:
            every_row = len(random_rows) == num_rows
            rows = None if every_row else torch.tensor(random_rows, device=x.device)
            sampled_ids = _sample_random(
                x if rows is None else x.index_select(0, rows),
                [float(_resolved(params[i], "temperature")) for i in random_rows],
                [int(_resolved(params[i], "top_k")) for i in random_rows],
                [float(_resolved(params[i], "top_p")) for i in random_rows],
                [float(_resolved(params[i], "min_p")) for i in random_rows],
                [generators[i] if generators else None for i in random_rows],
            )
            if token_ids is None:
                token_ids = sampled_ids
            else:
                token_ids[rows] = sampled_ids
        assert token_ids is not None

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
        device = x.device
        index = torch.tensor(rows, device=device)
        # one spare column receives every padding id, so the scatters below need no masks
        sub = torch.empty(len(rows), vocab + 1, device=device)  # [r, V + 1]
        sub[:, :vocab] = x.index_select(0, index)
        outputs = _padded_ids([output_ids[i] for i in rows], vocab, device)  # [r, Lo]
        rep = [float(_resolved(params[i], "repetition_penalty")) for i in rows]
        if any(r != 1.0 for r in rep):
            prompts = _padded_ids([prompt_ids[i] if rep[j] != 1.0 else () for j, i in enumerate(rows)], vocab, device)
            seen = torch.cat([prompts, outputs], dim=1)  # [r, Lp + Lo], repeats give repeated identical writes
            values = sub.gather(1, seen)
            penalty = torch.tensor(rep, device=device).unsqueeze(1)
            sub.scatter_(1, seen, torch.where(values > 0, values / penalty, values * penalty))
        frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=device).unsqueeze(1)
        presence = torch.tensor([params[i].presence_penalty for i in rows], device=device).unsqueeze(1)
        # frequency counts every occurrence; presence only the first of each id (a run in the sorted ids)
        ordered = outputs.sort(dim=1).values
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        sub.scatter_add_(1, ordered, -(frequency + presence * first))
        x.index_copy_(0, index, sub[:, :vocab])


def _sample_random(
    x: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    min_p: Sequence[float],
    generators: Sequence[torch.Generator | None],
    *,
    allow_head: bool = True,
) -> torch.Tensor:
    """Token ids [r] drawn from processed logits `x` [r, V] after temperature, top-k, min_p and top-p.

    Top-k and min_p are both logit thresholds (min_p: p_i < min_p * p_max ⇔ x_i < x_max + ln min_p), so their order
    does not matter, and top-k keeps every logit tied with the k-th. When every row has top-k, the draw works on
    the sorted top-k head only; the noise is still one full row per request, gathered at the head's ids, so both
    paths draw the same token.
    """
    vocab, device = x.shape[1], x.device
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    temp = torch.tensor(temperature, device=device).unsqueeze(1)
    if allow_head and all(k < vocab for k in ks):
        values, ids = x.topk(max(ks), dim=-1)  # [r, k_max], sorted descending
        kth = values.gather(1, torch.tensor([k - 1 for k in ks], device=device).unsqueeze(1))
        # logits tied with the k-th one beyond the head: take the general path, which keeps them
        if int((x >= kth).sum(dim=-1).max()) <= values.shape[1]:
            head = _min_p_top_p_sorted(values.masked_fill(values < kth, float("-inf")) / temp, min_p, top_p)
            q = _exponential_noise(x.shape, generators, device).gather(1, ids)
            choice = (torch.softmax(head, dim=-1) / q).argmax(dim=-1)
            return ids.gather(1, choice.unsqueeze(1)).squeeze(1)
    x = x / temp
    if any(k < vocab for k in ks):
        kth = x.topk(max(k for k in ks if k < vocab), dim=-1).values
        threshold = kth.gather(1, torch.tensor([min(k, kth.shape[1]) - 1 for k in ks], device=device).unsqueeze(1))
        threshold[torch.tensor([k == vocab for k in ks], device=device)] = float("-inf")
        x = x.masked_fill(x < threshold, float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_x, order = x.sort(dim=-1, descending=True)
        x = torch.empty_like(x).scatter_(1, order, _min_p_top_p_sorted(sorted_x, min_p, top_p))
    elif any(m > 0.0 for m in min_p):
        x = _apply_min_p(x, x.amax(dim=-1, keepdim=True), min_p)
    q = _exponential_noise(x.shape, generators, device)
    return (torch.softmax(x, dim=-1) / q).argmax(dim=-1)


def _apply_min_p(x: torch.Tensor, x_max: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    log_min_p = torch.tensor(min_p, device=x.device).log().unsqueeze(1)  # ln 0 = -inf keeps everything
    return x.masked_fill(x < x_max + log_min_p, float("-inf"))


def _min_p_top_p_sorted(sorted_x: torch.Tensor, min_p: Sequence[float], top_p: Sequence[float]) -> torch.Tensor:
    """min_p, then top-p (the smallest head holding mass >= p, plus ties), on logits sorted in descending order."""
    if any(m > 0.0 for m in min_p):
        sorted_x = _apply_min_p(sorted_x, sorted_x[:, :1], min_p)
    if not any(p < 1.0 for p in top_p):
        return sorted_x
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # rows without top-p get a threshold no cumulative sum reaches, even with rounding
    p = torch.tensor([q if q < 1.0 else 2.0 for q in top_p], device=sorted_x.device).unsqueeze(1)
    drop = mass_before >= p
    drop[:, 0] = False
    # logits tied with the last kept one are kept too, so the kept set does not depend on how ties were sorted
    cutoff = sorted_x.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)
    return sorted_x.masked_fill(sorted_x < cutoff, float("-inf"))


def _exponential_noise(
    shape: torch.Size, generators: Sequence[torch.Generator | None], device: torch.device
) -> torch.Tensor:
    """q ~ Exp(1) [r, V]; argmax(p / q) is a categorical draw. Seeded rows use their own generator, one full row."""
    q = torch.empty(shape, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        return q.exponential_()
    if unseeded:
        q[torch.tensor(unseeded, device=device)] = torch.empty((len(unseeded), shape[1]), device=device).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            q[i].exponential_(generator=generator)
    return q
