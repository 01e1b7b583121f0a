"""Runs the whole benchmark: ceilings first, then each model's phases in order, under a time budget.

Order is chosen so that the most important numbers land first when a run is cut short: the NVFP4 model (time to
first token, prefill, then decode from the smallest batch up), then the BF16 engine baseline, then transformers.
Before a model is built its memory is checked against what the device has free (weights from a meta-device copy,
caches sized for the workload, an estimate of the activation peak); batch sizes that do not fit are skipped and
the reason recorded. A phase that fails records its error and the run goes on. After every phase the caller's
`on_update` receives the results so far (the command writes the JSON each time, so a run killed at its time limit
still leaves everything measured up to then).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from fp4serve.bench import hf_bench
from fp4serve.bench.engine_bench import DecodeResult, EngineBench, PrefillResult, Workload, make_engine
from fp4serve.bench.geometry import geometry_config, text_config
from fp4serve.bench.random_model import build_random_model, meta_model
from fp4serve.bench.report import format_rate, run_info
from fp4serve.bench.roofline import Floor, Footprint, decode_floor, footprint, measure_ceilings, prefill_floor
from fp4serve.bench.settings import DEFINITIONS, BenchSettings
from fp4serve.config import EngineConfig
from fp4serve.engine.memory import format_bytes
from fp4serve.model.config import Qwen35TextConfig

Log = Callable[[str], None]


class Suite:
    def __init__(self, settings: BenchSettings, *, log: Log, on_update: Callable[[dict[str, Any]], None]) -> None:
        settings.validate()
        self.s = settings
        self.log = log
        self.on_update = on_update
        engine_config = EngineConfig(device=settings.device, dtype=settings.dtype)
        self.device = torch.device(engine_config.resolved_device())
        self.dtype: torch.dtype = getattr(torch, engine_config.resolved_dtype_name(self.device.type))
        self.config_dict = geometry_config(
            settings.geometry, num_layers=settings.num_layers, vocab_size=settings.vocab_size
        )
        self.config: Qwen35TextConfig = text_config(self.config_dict)
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {
            **run_info(self.device),
            "settings": dataclasses.asdict(settings),
            "geometry": self.config_dict,
            "definitions": DEFINITIONS,
            "models": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.s.time_budget_s is not None and self.elapsed() > self.s.time_budget_s

    def _budget_note(self) -> str:
        return f"skipped: the time budget of {self.s.time_budget_s:.0f} s was used up"

    def _update(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 3)
        self.on_update(self.results)

    def run(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        self.log(f"device {self.device}, dtype {str(self.dtype).removeprefix('torch.')}, geometry {self.s.geometry}")
        self.ceilings = measure_ceilings(
            self.device,
            self.dtype,
            copy_bytes=self.s.copy_bytes or (2 << 30 if cuda else 32 << 20),
            matmul_size=self.s.matmul_size or (8192 if cuda else 512),
        )
        self.results["ceilings"] = dataclasses.asdict(self.ceilings)
        self.log(
            f"copy bandwidth {format_rate(self.ceilings.copy_bytes_per_s, 'B/s')}, "
            f"matmul {format_rate(self.ceilings.matmul_flops_per_s, 'FLOP/s')}"
        )
        self._update()
        for kind in self.s.models:
            if self.over_budget():
                self.results["models"][kind] = {"status": self._budget_note()}
            elif kind == "transformers":
                self._guarded(kind, self._run_transformers)
            else:
                self._guarded(kind, lambda k=kind: self._run_engine_model(k))
            self._release()
            self._update()
        return self.results

    def _guarded(self, kind: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # a failing model must not lose the others' numbers
            traceback.print_exc()
            entry = self.results["models"].setdefault(kind, {})
            entry["status"] = f"error: {type(exc).__name__}: {exc}"
            self.log(f"{kind}: {entry['status']}")

    def _release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _free_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        self._release()
        return torch.cuda.mem_get_info(self.device)[0]

    def _margin(self, quant: str, workload: Workload) -> int:
        if self.s.memory_margin_bytes is not None:
            return self.s.memory_margin_bytes
        c = self.config
        per_token = 4 * (3 * c.intermediate_size + 2 * c.conv_dim + 2 * c.linear_value_dim + 8 * c.hidden_size)
        longest = min(workload.max_num_batched_tokens, max(self.s.prefill_len, self.s.ttft_len, self.s.context_len))
        attention = 3 * 4 * c.num_attention_heads * longest**2
        logits = 4 * 4 * workload.max_num_seqs() * c.vocab_size
        # the reference NVFP4 path dequantizes one weight at a time through int64 and float32 temporaries
        dequant = 16 * c.hidden_size * c.intermediate_size if quant == "nvfp4" else 0
        return workload.max_num_batched_tokens * per_token + attention + logits + dequant + (1 << 30)

    def _fit(self, kind: str, quant: str, shapes: torch.nn.Module, entry: dict[str, Any]) -> Workload | None:
        """The workload with the batch sizes that fit in free device memory (None: not even the smallest)."""
        wanted = tuple(sorted(self.s.batch_sizes))
        free = self._free_bytes()
        if free is None:
            return self.s.workload(wanted)
        weights = sum(t.nbytes for t in shapes.parameters()) + sum(t.nbytes for t in shapes.buffers())
        for n in range(len(wanted), -1, -1):
            workload = self.s.workload(wanted[:n])
            need = weights + workload.cache_bytes(shapes, self.dtype) + self._margin(quant, workload)
            if need <= free:
                skipped = wanted[n:]
                if skipped and "decode" in self.s.phases:
                    note = (
                        f"decode batch sizes {list(skipped)} skipped: they do not fit in the {format_bytes(free)} "
                        f"free on the device next to {format_bytes(weights)} of {kind} weights"
                    )
                    entry.setdefault("notes", []).append(note)
                    self.log(f"{kind}: {note}")
                return workload
        entry["status"] = (
            f"skipped: needs at least {format_bytes(need)} (weights {format_bytes(weights)}), "
            f"{format_bytes(free)} free on the device"
        )
        self.log(f"{kind}: {entry['status']}")
        return None

    def _run_engine_model(self, kind: str) -> None:
        s = self.s
        quant = "nvfp4" if kind == "nvfp4" else "bf16"
        dtype_name = str(self.dtype).removeprefix("torch.")
        entry: dict[str, Any] = {"label": f"fp4serve {quant if quant == 'nvfp4' else dtype_name}", "quant": quant}
        entry["dtype"] = dtype_name
        self.results["models"][kind] = entry
        shapes = meta_model(self.config, quant=quant, dtype=self.dtype, linear_mode=s.linear_mode)
        workload = self._fit(kind, quant, shapes, entry)
        if workload is None:
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        model = build_random_model(
            self.config, quant=quant, device=self.device, dtype=self.dtype, seed=s.seed, linear_mode=s.linear_mode
        )
        self._sync()
        entry["build_s"] = round(time.perf_counter() - t, 3)
        entry["weight_bytes"] = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
        if self.device.type == "cuda":
            entry["memory_allocated_after_build"] = torch.cuda.memory_allocated(self.device)
        self.log(f"{kind}: built in {entry['build_s']:.1f} s, weights {format_bytes(entry['weight_bytes'])}")
        engine = make_engine(
            model,
            workload,
            device=self.device,
            dtype=self.dtype,
            enforce_eager=s.enforce_eager,
            max_position_embeddings=self.config_dict["max_position_embeddings"],
            seed=s.seed,
        )
        entry["cache_bytes"] = workload.cache_bytes(model, self.dtype)
        entry["max_num_seqs"] = workload.max_num_seqs()
        bench = EngineBench(engine, vocab_size=self.config.vocab_size, seed=s.seed)
        entry["finite_hidden_states"] = bench.check_finite()
        fp = footprint(
            model,
            self.config,
            state_bytes_per_seq=model.state_bytes_per_slot(self.dtype),
            kv_bytes_per_token=model.kv_bytes_per_token(self.dtype),
        )
        entry["footprint"] = dataclasses.asdict(fp)
        self._update()
        self._phases(
            kind,
            entry,
            fp,
            decode=lambda b: bench.decode(
                batch=b,
                context_len=s.context_len,
                warmup=s.warmup_steps,
                steps=s.decode_steps,
                max_tokens=workload.decode_max_tokens(b),
            ),
            prefill=lambda: bench.prefill(
                num_prompts=s.prefill_prompts, prompt_len=s.prefill_len, warmup=s.warmup_runs, runs=s.runs
            ),
            ttft=lambda: bench.ttft(prompt_len=s.ttft_len, warmup=s.warmup_runs, runs=s.runs),
            batch_sizes=workload.batch_sizes,
            recover=bench.abort_all,
        )
        if self.device.type == "cuda":
            entry["peak_memory_allocated"] = torch.cuda.max_memory_allocated(self.device)
        entry.setdefault("status", "ok")

    def _run_transformers(self) -> None:
        s = self.s
        entry: dict[str, Any] = {"label": f"transformers {str(self.dtype).removeprefix('torch.')}"}
        self.results["models"]["transformers"] = entry
        version = hf_bench.transformers_version()
        if version is None:
            entry["status"] = "skipped: transformers with Qwen3.5 is not importable"
            self.log(f"transformers: {entry['status']}")
            return
        entry.update(
            version=version, fla_available=hf_bench.fla_available(), dtype=str(self.dtype).removeprefix("torch.")
        )
        shapes = meta_model(self.config, quant="bf16", dtype=self.dtype)
        free = self._free_bytes()
        weights = sum(t.nbytes for t in shapes.parameters())
        workload = self.s.workload(tuple(sorted(s.hf_batch_sizes)))
        if free is not None and weights + self._margin("bf16", workload) > free:
            entry["status"] = f"skipped: {format_bytes(weights)} of weights do not fit in {format_bytes(free)} free"
            self.log(f"transformers: {entry['status']}")
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        model = hf_bench.build_hf_model(self.config_dict, device=self.device, dtype=self.dtype, seed=s.seed)
        self._sync()
        entry["build_s"] = round(time.perf_counter() - t, 3)
        entry["weight_bytes"] = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
        self.log(
            f"transformers {version}: built in {entry['build_s']:.1f} s, weights {format_bytes(entry['weight_bytes'])}"
        )
        # the byte counts of the state and KV are those of our engine for the same geometry
        fp = footprint(
            model,
            self.config,
            state_bytes_per_seq=shapes.state_bytes_per_slot(self.dtype),
            kv_bytes_per_token=shapes.kv_bytes_per_token(self.dtype),
        )
        entry["footprint"] = dataclasses.asdict(fp)
        bench = hf_bench.HFBench(model, device=self.device, vocab_size=self.config.vocab_size, seed=s.seed)
        self._phases(
            "transformers",
            entry,
            fp,
            decode=lambda b: bench.decode(
                batch=b, context_len=s.context_len, warmup=s.warmup_steps, steps=s.decode_steps
            ),
            prefill=lambda: (
                bench.prefill(
                    num_prompts=s.prefill_prompts, prompt_len=s.prefill_len, warmup=s.warmup_runs, runs=s.runs
                ),
                1,
            ),
            ttft=lambda: bench.ttft(prompt_len=s.ttft_len, warmup=s.warmup_runs, runs=s.runs),
            batch_sizes=workload.batch_sizes,
            recover=lambda: None,
        )
        if self.device.type == "cuda":
            entry["peak_memory_allocated"] = torch.cuda.max_memory_allocated(self.device)
        entry.setdefault("status", "ok")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _phases(
        self,
        kind: str,
        entry: dict[str, Any],
        fp: Footprint,
        *,
        decode: Callable[[int], DecodeResult],
        prefill: Callable[[], tuple[PrefillResult, int]],
        ttft: Callable[[], list[float]],
        batch_sizes: tuple[int, ...],
        recover: Callable[[], None],
    ) -> None:
        s = self.s
        if "ttft" in s.phases:
            entry["ttft"] = self._phase(kind, "ttft", lambda: self._ttft_entry(fp, ttft()), recover)
        if "prefill" in s.phases:
            entry["prefill"] = self._phase(kind, "prefill", lambda: self._prefill_entry(fp, *prefill()), recover)
        if "decode" in s.phases:
            entry["decode"] = []
            for b in batch_sizes:
                result = self._phase(kind, f"decode batch {b}", lambda b=b: self._decode_entry(fp, decode(b)), recover)
                entry["decode"].append({"batch": b, **result})

    def _phase(
        self, kind: str, name: str, fn: Callable[[], dict[str, Any]], recover: Callable[[], None]
    ) -> dict[str, Any]:
        if self.over_budget():
            self.log(f"{kind} {name}: {self._budget_note()}")
            return {"status": self._budget_note()}
        t = time.perf_counter()
        try:
            result = {"status": "ok", **fn()}
        except Exception as exc:
            traceback.print_exc()
            result = {"status": f"error: {type(exc).__name__}: {exc}"}
            # leave nothing behind that would break the next phase
            recover()
            self._release()
        result["phase_s"] = round(time.perf_counter() - t, 3)
        self.log(f"{kind} {name}: {_summary(result)} ({result['phase_s']:.1f} s)")
        self._update()
        return result

    def _decode_entry(self, fp: Footprint, r: DecodeResult) -> dict[str, Any]:
        floor = decode_floor(fp, self.ceilings, batch=r.batch, context_len=round(r.mean_context_len))
        return {
            "context_len": r.context_len,
            "mean_context_len": round(r.mean_context_len, 1),
            "steps": len(r.step_s),
            "warmup_steps": r.warmup_steps,
            "step_ms_median": 1e3 * r.median_step_s,
            "step_ms_mean": 1e3 * statistics.fmean(r.step_s),
            "step_ms_min": 1e3 * min(r.step_s),
            "step_ms_max": 1e3 * max(r.step_s),
            "tok_s": r.tok_s,
            "context_fill_s": r.context_fill_s,
            "context_fill_tok_s": r.batch * r.context_len / r.context_fill_s,
            "floor": _floor_dict(floor),
            "floor_tok_s": r.batch / floor.seconds,
            "fraction_of_floor": floor.seconds / r.median_step_s,
        }

    def _prefill_entry(self, fp: Footprint, r: PrefillResult, num_forwards: int) -> dict[str, Any]:
        floor = prefill_floor(fp, self.ceilings, prompt_lens=[r.prompt_len] * r.num_prompts, num_forwards=num_forwards)
        return {
            "num_prompts": r.num_prompts,
            "prompt_len": r.prompt_len,
            "runs_s": r.run_s,
            "seconds_median": r.median_s,
            "engine_steps": num_forwards,
            "tok_s": r.tok_s,
            "floor": _floor_dict(floor),
            "floor_tok_s": r.num_prompts * r.prompt_len / floor.seconds,
            "fraction_of_floor": floor.seconds / r.median_s,
        }

    def _ttft_entry(self, fp: Footprint, runs: list[float]) -> dict[str, Any]:
        floor = prefill_floor(fp, self.ceilings, prompt_lens=[self.s.ttft_len], num_forwards=1)
        median = statistics.median(runs)
        return {
            "prompt_len": self.s.ttft_len,
            "runs_ms": [1e3 * t for t in runs],
            "ms_median": 1e3 * median,
            "floor": _floor_dict(floor),
            "floor_ms": 1e3 * floor.seconds,
            "fraction_of_floor": floor.seconds / median,
        }


def _floor_dict(floor: Floor) -> dict[str, Any]:
    return {"bytes": floor.bytes, "flops": floor.flops, "seconds": floor.seconds, "bound": floor.bound}


def _summary(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return result["status"]
    if "ms_median" in result:
        return f"{result['ms_median']:.1f} ms ({100 * result['fraction_of_floor']:.0f}% of floor)"
    return f"{result['tok_s']:,.1f} tok/s ({100 * result['fraction_of_floor']:.0f}% of floor)"
