#!/usr/bin/env bash
# GPU validation of the fast path in one device call: every GPU-marked test of every module, then a short
# `fp4serve bench` of the 27B-width 4-layer slice (NVFP4 decode) with CUDA graphs and with --enforce-eager, to show
# what the graphs buy. Logs and JSON go under $OUT; a short summary is printed last. Run from the repository root
# with the wheels in .whl/ (carry [".whl"]). Each part has its own time cap so the whole stays under ~5 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

timeout 150 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --durations=15 -rfE 2>&1 | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}

bench() {
  timeout 55 python3 -m fp4serve bench --geometry 27b-4l --models nvfp4 --phases decode --batch-sizes 1,8,32 \
    --context-len 512 --warmup-steps 3 --decode-steps 10 --copy-bytes 512MiB --matmul-size 4096 \
    --output "$OUT/$1.json" --chart "$OUT/$1.png" "${@:2}" 2>&1 | tee "$OUT/$1.log"
}
bench bench_graphs
bench bench_eager --enforce-eager

python3 - "$OUT" "$tests_rc" <<'PY'
import json, pathlib, sys
out, rc = pathlib.Path(sys.argv[1]), sys.argv[2]
print("\n=== summary ===")
print("gpu:", (out / "gpu.txt").read_text().strip())
log = (out / "pytest_gpu.log").read_text().strip().splitlines()
print("gpu tests (rc %s):" % rc, log[-1] if log else "no output")
rows = {}
for name in ("bench_graphs", "bench_eager"):
    path = out / f"{name}.json"
    if not path.is_file():
        print(name, "no JSON")
        continue
    entry = json.loads(path.read_text())["models"].get("nvfp4", {})
    for d in entry.get("decode", []):
        rows.setdefault(d["batch"], {})[name] = d.get("step_ms_median"), d.get("tok_s"), d.get("status")
print("27b-4l NVFP4 decode (ctx 512): batch | graphs ms/step tok/s | eager ms/step tok/s | speedup")
for b, r in sorted(rows.items()):
    g, e = r.get("bench_graphs", (None, None, "-")), r.get("bench_eager", (None, None, "-"))
    speed = f"{e[0] / g[0]:.2f}x" if g[0] and e[0] else "-"
    fmt = lambda x: "-" if x[0] is None else f"{x[0]:.2f} {x[1]:.0f}"
    print(f"  {b:4d} | {fmt(g)} ({g[2]}) | {fmt(e)} ({e[2]}) | {speed}")
PY
