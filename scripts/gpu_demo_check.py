"""GPU smoke check of the bundled demo model: load on CUDA, decode with CUDA graphs and eagerly, same greedy tokens."""

from __future__ import annotations

import logging

from fp4serve import LLM, SamplingParams

logging.basicConfig(level=logging.WARNING)
prompts = ["It is a truth universally acknowledged, that", "Mr. Darcy", "The ball at Netherfield"]
params = SamplingParams(temperature=0.0, max_tokens=24)
outs = {}
for eager in (False, True):
    llm = LLM("fp4serve/demo_model", device="cuda", enforce_eager=eager, gpu_memory_utilization=0.3, max_num_seqs=8)
    graphs = llm.engine.runner.decode_graphs
    print("eager" if eager else "graphs", "captured buckets:", None if graphs is None else sorted(graphs.graphs))
    outs[eager] = [o.token_ids for o in llm.generate(prompts, params)]
    print(repr(llm.generate(prompts[:1], params)[0].text))
    del llm
print("graph tokens == eager tokens:", outs[False] == outs[True])
assert outs[False] == outs[True]
