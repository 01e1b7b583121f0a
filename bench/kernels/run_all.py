"""Kernel micro-benchmarks on one GPU: every fp4serve Triton kernel against its baseline, JSON out, table last.

Baselines: measured device copy bandwidth (bytes read + written) for the bandwidth-bound kernels, and cuBLAS bf16
matmul (torch) for the GEMMs. Timing: each case is captured in a CUDA graph as `reps` back-to-back calls that cycle
through `copies` independent input sets (so repeated calls cannot hit in L2: >= 4 x the 50 MB L2), replayed after a
warm-up; the median over replays, divided by reps, is the per-call time. No launch gaps, no L2 reuse.

Usage: python bench/kernels/run_all.py --out DIR [--quick] [--only gemm,norm,...]
"""

# ruff: noqa: B023  (every lambda here runs before its loop variable changes)
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fp4serve.ops.triton import conv1d, gdn, nvfp4_gemm, paged_attention, rmsnorm  # noqa: E402
from fp4serve.ops.triton.nvfp4_gemm import GemmConfig  # noqa: E402

SHAPES_27B = [(17408, 5120), (5120, 17408), (10240, 5120), (6144, 5120), (12288, 5120), (5120, 6144)]
RESULTS: list[dict] = []


def bench(calls: list[Callable[[], object]], reps: int = 20, replays: int = 7) -> float:
    """Median seconds per call over `replays` replays of a graph holding `reps` calls cycling through `calls`."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for c in calls:  # warm the allocator on the capture stream
            c()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(reps):
                calls[i % len(calls)]()
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def record(kind: str, **fields: object) -> dict:
    row = {"kernel": kind, **fields}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    return row


def copy_bandwidth() -> float:
    n = 1 << 28  # 1 GiB of fp32 per buffer
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    t = bench([lambda: dst.copy_(src)], reps=5, replays=5)
    gbps = 2 * n * 4 / t / 1e9
    record("copy", bytes=2 * n * 4, time_us=t * 1e6, gbps=gbps)
    return gbps


def cublas_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench([lambda: a @ b], reps=5, replays=5)
    tf = 2 * 8192**3 / t / 1e12
    record("cublas_bf16_8192", time_us=t * 1e6, tflops=tf)
    return tf


def make_weights(n: int, k: int, copies: int) -> list[nvfp4_gemm.NVFP4KernelWeight]:
    out = []
    for _ in range(copies):
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        s = (2.0 ** (torch.rand(n, k // 16, device="cuda") * 8)).to(torch.float8_e4m3fn)
        out.append(nvfp4_gemm.prepare_nvfp4_weight(w, s, torch.tensor(0.01, device="cuda")))
    return out


def gemm_configs(m: int) -> list[GemmConfig]:
    if m == 1:
        return [
            GemmConfig("gemv", 1, bn, bk, split, 4, 3, x_bcast=xb)
            for bn in (16, 32)
            for bk in (256, 512, 1024)
            for split in (1, 2, 4)
            for xb in (True, False)
        ]
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    cfgs = [GemmConfig("mma", bm, bn, bk, split, 4, 3) for bn in (64, 128) for bk in (128, 256) for split in (2, 4, 8)]
    cfgs += [GemmConfig("mma", bm, 64, 128, 4, 8, 3), GemmConfig("mma", bm, 64, 128, 4, 4, 2)]
    if m <= 4:
        cfgs += [GemmConfig("gemv", 1, 16, 512, split, 4, 3) for split in (1, 2)]
    return cfgs


def gemm_suite(copy_gbps: float, quick: bool, sweep_m: set[int]) -> None:
    for n, k in SHAPES_27B:
        wbytes = n * k // 2 + n * k // 16
        copies = max(2, math.ceil(4 * 50e6 / wbytes))
        ws = make_weights(n, k, copies)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 4))]
        for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(len(ws))]
            t_cublas = bench([lambda i=i: xs[i] @ dense[i % len(dense)].T for i in range(len(dense))])
            flops = 2 * m * n * k
            t_default = bench([lambda i=i: nvfp4_gemm.nvfp4_gemm(xs[i], ws[i]) for i in range(len(ws))])
            cfg = nvfp4_gemm.pick_config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            row = {
                "n": n, "k": k, "m": m, "path": cfg.kind, "time_us": t_default * 1e6,
                "weight_gbps": wbytes / t_default / 1e9, "frac_copy_bw": wbytes / t_default / 1e9 / copy_gbps,
                "tflops": flops / t_default / 1e12, "cublas_bf16_us": t_cublas * 1e6,
                "vs_cublas": t_cublas / t_default,
            }  # fmt: skip
            record("nvfp4_gemm", **row)
            if quick or m not in sweep_m:
                continue
            best = (t_default, "default")
            sweep = gemm_configs(m) if m <= 32 else [GemmConfig("mma", 64, bn, 128, 1, 4, 3) for bn in (64, 128)]
            if m >= 64:
                sweep.append(GemmConfig("dense"))
            for c in sweep:
                try:
                    if c.kind == "dense":
                        fn = [lambda i=i: xs[i] @ nvfp4_gemm.nvfp4_dequant(ws[i]).T for i in range(len(ws))]
                    else:
                        fn = [lambda i=i, c=c: nvfp4_gemm.nvfp4_gemm(xs[i], ws[i], config=c) for i in range(len(ws))]
                    t = bench(fn, reps=10, replays=5)
                except Exception as e:  # a config the compiler rejects (e.g. out of shared memory) is skipped
                    record("nvfp4_gemm_cfg_error", n=n, k=k, m=m, cfg=repr(c), error=str(e)[:200])
                    continue
                record(
                    "nvfp4_gemm_cfg",
                    n=n,
                    k=k,
                    m=m,
                    cfg=repr(c),
                    time_us=t * 1e6,
                    frac_copy_bw=wbytes / t / 1e9 / copy_gbps,
                )
                if t < best[0]:
                    best = (t, repr(c))
            record(
                "nvfp4_gemm_best", n=n, k=k, m=m, best_us=best[0] * 1e6, best_cfg=best[1], default_us=t_default * 1e6
            )
        # the transient dequant alone (prefill path): bytes = packed in + bf16 out
        for bn, bk, cc in ((32, 256, True), (32, 256, False), (16, 512, True), (64, 128, True), (8, 1024, True)):
            fn = [
                lambda i=i: nvfp4_gemm.nvfp4_dequant(ws[i], block_n=bn, block_k=bk, concat=cc) for i in range(len(ws))
            ]
            t = bench(fn, reps=8, replays=5)
            gbps = (wbytes + 2 * n * k) / t / 1e9
            record("nvfp4_dequant", n=n, k=k, block_n=bn, block_k=bk, concat=cc, time_us=t * 1e6, gbps=gbps,
                   frac_copy_bw=gbps / copy_gbps)  # fmt: skip


def norm_suite(copy_gbps: float) -> None:
    for rows in (1, 32, 2048):
        d = 5120
        sets = [[torch.randn(rows, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)] for _ in range(8)]
        w = torch.randn(d, device="cuda")
        t = bench([lambda s=s: rmsnorm.rmsnorm(s[0], w, 1e-6, s[1]) for s in sets])
        t_ref = bench([lambda s=s: rmsnorm.rmsnorm_ref(s[0], w, 1e-6, s[1]) for s in sets])
        nbytes = 4 * rows * d * 2
        record("fused_add_rmsnorm", rows=rows, d=d, time_us=t * 1e6, gbps=nbytes / t / 1e9,
               frac_copy_bw=nbytes / t / 1e9 / copy_gbps, torch_ref_us=t_ref * 1e6)  # fmt: skip
    for rows in (48, 48 * 32, 48 * 2048):
        sets = [[torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)] for _ in range(8)]
        w = torch.randn(128, device="cuda")
        t = bench([lambda s=s: rmsnorm.gated_rmsnorm(s[0], s[1], w, 1e-6) for s in sets])
        t_ref = bench([lambda s=s: rmsnorm.gated_rmsnorm_ref(s[0], s[1], w, 1e-6) for s in sets])
        nbytes = 3 * rows * 128 * 2
        record("gated_rmsnorm", rows=rows, d=128, time_us=t * 1e6, gbps=nbytes / t / 1e9,
               frac_copy_bw=nbytes / t / 1e9 / copy_gbps, torch_ref_us=t_ref * 1e6)  # fmt: skip


def conv_suite(copy_gbps: float) -> None:
    c = 10240
    w = torch.randn(c, 1, 4, device="cuda", dtype=torch.bfloat16)
    for bsz in (1, 32, 128):
        state = torch.randn(256, c, 3, device="cuda", dtype=torch.bfloat16)
        idx = torch.randperm(256, device="cuda")[:bsz]
        xs = [torch.randn(bsz, c, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        t = bench([lambda x=x: conv1d.causal_conv1d_update(x, w, state, idx) for x in xs])
        nbytes = bsz * c * 2 * (1 + 1 + 3 + 3)
        record("conv1d_update", batch=bsz, channels=c, time_us=t * 1e6, gbps=nbytes / t / 1e9,
               frac_copy_bw=nbytes / t / 1e9 / copy_gbps)  # fmt: skip
    lens = [2048] * 8
    state = torch.randn(16, c, 3, device="cuda", dtype=torch.bfloat16)
    idx = torch.arange(8, device="cuda")
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    init = torch.zeros(8, dtype=torch.bool, device="cuda")
    xs = [torch.randn(sum(lens), c, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    t = bench([lambda x=x: conv1d.causal_conv1d_varlen(x, w, state, cu, idx, init, 2048) for x in xs], reps=6)
    nbytes = sum(lens) * c * 2 * 2
    record("conv1d_varlen", tokens=sum(lens), channels=c, time_us=t * 1e6, gbps=nbytes / t / 1e9,
           frac_copy_bw=nbytes / t / 1e9 / copy_gbps)  # fmt: skip


def attention_suite(copy_gbps: float) -> None:
    hq, hkv, d, block = 24, 4, 256, 16
    for bsz, ctx in ((1, 1024), (1, 8192), (32, 1024), (128, 1024), (8, 32768)):
        blocks_per = ctx // block
        num_blocks = bsz * blocks_per
        kv = torch.randn(2, num_blocks, block, hkv, d, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(num_blocks, device="cuda").reshape(bsz, blocks_per).int()
        lens = torch.full((bsz,), ctx, dtype=torch.int32, device="cuda")
        qs = [torch.randn(bsz, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        for splits in (2, 4, 8, 16, 32) if bsz == 1 else ():
            fn = [
                lambda q=q: paged_attention.paged_decode_attention(
                    q, kv, tables, lens, 1 / 16, max_seq_len=ctx, num_splits=splits
                )
                for q in qs
            ]
            record("paged_decode_attention_splits", batch=bsz, ctx=ctx, splits=splits, time_us=bench(fn) * 1e6)
        t = bench(
            [
                lambda q=q: paged_attention.paged_decode_attention(q, kv, tables, lens, 1 / 16, max_seq_len=ctx)
                for q in qs
            ]
        )
        nbytes = bsz * ctx * hkv * d * 2 * 2
        record("paged_decode_attention", batch=bsz, ctx=ctx, time_us=t * 1e6, gbps=nbytes / t / 1e9,
               frac_copy_bw=nbytes / t / 1e9 / copy_gbps)  # fmt: skip


def gdn_suite(copy_gbps: float) -> None:
    h, hv, dk, dv = 16, 48, 128, 128
    a_log = torch.rand(hv, device="cuda")
    dt_bias = torch.randn(hv, device="cuda")
    for bsz in (1, 32, 128):
        slots = max(bsz, 4) * 2
        state = torch.randn(slots, hv, dk, dv, device="cuda") * 0.1
        idx = torch.randperm(slots, device="cuda")[:bsz]
        cu = torch.arange(bsz + 1, dtype=torch.int32, device="cuda")
        init = torch.ones(bsz, dtype=torch.bool, device="cuda")
        sets = []
        for _ in range(4):
            conv = torch.randn(bsz, 2 * h * dk + hv * dv, device="cuda", dtype=torch.bfloat16)
            ab = torch.randn(bsz, 2 * hv, device="cuda", dtype=torch.bfloat16)
            sets.append((conv[:, : h * dk].view(bsz, h, dk), conv[:, h * dk : 2 * h * dk].view(bsz, h, dk),
                         conv[:, 2 * h * dk :].view(bsz, hv, dv), ab[:, :hv], ab[:, hv:]))  # fmt: skip
        t = bench([lambda s=s: gdn.gdn_recurrent(*s, a_log, dt_bias, state, idx, cu, init) for s in sets])
        nbytes = bsz * hv * dk * dv * 4 * 2
        record("gdn_recurrent_decode", batch=bsz, time_us=t * 1e6, gbps=nbytes / t / 1e9,
               frac_copy_bw=nbytes / t / 1e9 / copy_gbps)  # fmt: skip
    try:
        import fla  # noqa: F401
    except ImportError:
        record("gdn_chunk_prefill", error="fla-core not installed")
        return
    for lens in ([2048], [2048] * 8):
        t_all = sum(lens)
        state = torch.zeros(len(lens), hv, dk, dv, device="cuda")
        idx = torch.arange(len(lens), device="cuda")
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        init = torch.zeros(len(lens), dtype=torch.bool, device="cuda")
        conv = torch.randn(t_all, 2 * h * dk + hv * dv, device="cuda", dtype=torch.bfloat16)
        ab = torch.randn(t_all, 2 * hv, device="cuda", dtype=torch.bfloat16)
        q, k = conv[:, : h * dk].view(t_all, h, dk), conv[:, h * dk : 2 * h * dk].view(t_all, h, dk)
        v = conv[:, 2 * h * dk :].view(t_all, hv, dv)
        args = (q, k, v, ab[:, :hv], ab[:, hv:], a_log, dt_bias, state, idx, cu, init)
        fn = lambda: gdn.gdn_chunk_prefill(*args)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):  # fla syncs on cu_seqlens (host copy): time eagerly
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        t_rec = bench([lambda: gdn.gdn_recurrent(*args)], reps=2, replays=3)
        record("gdn_chunk_prefill", tokens=t_all, seqs=len(lens), time_us=t * 1e6, recurrent_us=t_rec * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="gemm,norm,conv,attention,gdn")
    ap.add_argument("--sweep-m", default="1,2,4,16,32,64,128,256,2048", help="M values that get a config sweep")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    env = {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    record("env", **env)
    copy_gbps = copy_bandwidth()
    cublas_tflops()
    sweep_m = {int(v) for v in args.sweep_m.split(",") if v}
    suites = {"gemm": lambda: gemm_suite(copy_gbps, args.quick, sweep_m), "norm": lambda: norm_suite(copy_gbps),
              "conv": lambda: conv_suite(copy_gbps), "attention": lambda: attention_suite(copy_gbps),
              "gdn": lambda: gdn_suite(copy_gbps)}  # fmt: skip
    for name in args.only.split(","):
        t0 = time.time()
        try:
            suites[name]()
        except Exception as e:  # keep the other suites' numbers when one breaks
            record("suite_error", suite=name, error=repr(e)[:500])
        print(f"# suite {name}: {time.time() - t0:.1f} s", flush=True)
        (args.out / "kernels.json").write_text(json.dumps({"env": env, "results": RESULTS}, indent=1))
    print_table(copy_gbps)
    return 0


def print_table(copy_gbps: float) -> None:
    print(f"\n== {RESULTS[0]['gpu']}  copy {copy_gbps:.0f} GB/s ==")
    for r in RESULTS:
        if r["kernel"] == "nvfp4_gemm" and r["m"] in (1, 8, 32, 2048):
            head = f"gemm {r['n']}x{r['k']} M={r['m']:<5} {r['path']:5} {r['time_us']:8.1f} us"
            bw = f"{100 * r['frac_copy_bw']:5.1f}% bw"
            print(f"{head} {bw}  cublas {r['cublas_bf16_us']:8.1f} us  x{r['vs_cublas']:.2f}")
        elif r["kernel"] == "nvfp4_gemm_best":
            head = f"best {r['n']}x{r['k']} M={r['m']:<5} {r['best_us']:8.1f} us"
            print(f"{head} (default {r['default_us']:.1f}) {r['best_cfg']}")
        elif r["kernel"] not in ("nvfp4_gemm", "nvfp4_gemm_cfg", "env"):
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    raise SystemExit(main())
