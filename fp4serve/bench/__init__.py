"""`fp4serve bench`: the product's own benchmark, run through the real engine on a random-weight model.

`geometry` names model shapes (the real Qwen3.5-27B text geometry, a tiny one for CPU); `random_model` builds our
model with random NVFP4 (or BF16) weights directly on the target device; `roofline` measures the device's copy
bandwidth and matmul rate and counts the bytes and FLOPs each measurement must move, giving its floor;
`engine_bench` times decode, prefill and time to first token through `fp4serve.engine.Engine`; `hf_bench` does the
same for transformers' model as a baseline; `settings` says what a run measures; `suite` runs the phases under a
time budget; `report` writes the JSON, the chart and the table.
"""
