"""Prometheus metrics under vLLM's names (`vllm:*`, labels `model_name` and `engine`), written as exposition text.

A handful of counters and histograms do not justify the `prometheus_client` dependency, so this module keeps
them as plain numbers and renders the text format itself. Counters and histograms are updated by the request
handlers on the event loop; gauges (running / waiting requests, cache usage) are read from the engine when
`/metrics` is scraped, so they are never stale.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
FINISHED_REASONS = ("stop", "length", "abort")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(value: float) -> str:
    return repr(float(value))


class Metrics:
    """The server's metrics for one served model; `render()` gives the `/metrics` body."""

    def __init__(self, model_name: str, gauges: Callable[[], dict[str, float]] | None = None):
        self.model_name = model_name
        self.gauges = gauges
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.request_success = dict.fromkeys(FINISHED_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.rejected = 0

    def _labels(self, **extra: str) -> str:
        items = {"engine": "0", "model_name": self.model_name, **extra}
        parts = (f'{key}="{_escape(value)}"' for key, value in sorted(items.items()))
        return "{" + ",".join(parts) + "}"

    def record_finished(
        self, finish_reason: str | None, prompt_tokens: int, generation_tokens: int, e2e_seconds: float
    ) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens
        reason = finish_reason if finish_reason in self.request_success else "abort"
        self.request_success[reason] += 1
        self.e2e.observe(e2e_seconds)

    def render(self) -> str:
        lines: list[str] = []
        gauges = self.gauges() if self.gauges is not None else {}
        gauge_help = {
            "vllm:num_requests_running": "Number of requests in model execution batches.",
            "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
            "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
        }
        for name, text in gauge_help.items():
            lines += [
                f"# HELP {name} {text}",
                f"# TYPE {name} gauge",
                f"{name}{self._labels()} {_fmt(gauges.get(name, 0.0))}",
            ]
        counters = {
            "vllm:prompt_tokens": ("Number of prefill tokens processed.", self.prompt_tokens),
            "vllm:generation_tokens": ("Number of generation tokens processed.", self.generation_tokens),
            "vllm:request_rejected": ("Requests rejected because too many were waiting.", self.rejected),
        }
        for name, (text, value) in counters.items():
            lines += [
                f"# HELP {name}_total {text}",
                f"# TYPE {name}_total counter",
                f"{name}_total{self._labels()} {_fmt(value)}",
            ]
        lines += [
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason, value in self.request_success.items():
            lines.append(f"vllm:request_success_total{self._labels(finished_reason=reason)} {_fmt(value)}")
        histograms = {
            "vllm:time_to_first_token_seconds": ("Histogram of time to first token in seconds.", self.ttft),
            "vllm:inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.", self.itl),
            "vllm:e2e_request_latency_seconds": ("Histogram of e2e request latency in seconds.", self.e2e),
        }
        for name, (text, hist) in histograms.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
            cumulative = 0
            for bound, count in zip((*hist.buckets, float("inf")), hist.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else _fmt(bound)
                lines.append(f"{name}_bucket{self._labels(le=le)} {_fmt(cumulative)}")
            lines.append(f"{name}_count{self._labels()} {_fmt(hist.count)}")
            lines.append(f"{name}_sum{self._labels()} {_fmt(hist.total)}")
        return "\n".join(lines) + "\n"
