"""Images and video through the real engine (scheduler → runner → model), against transformers' logits.

The fp32 tiny checkpoint is loaded with `Engine.from_pretrained` (text model + vision tower); an image prompt and a
video prompt run together under a small token budget, so prefill is chunked with boundaries inside the
placeholder runs and the two requests share steps (feature rows offset into the flat batch). The logits the model
computes on that path are tapped and compared with transformers' `Qwen3_5ForConditionalGeneration` on the prompt
plus the generated tokens: every sampled row (last prompt token, then each decode step) within 1e-4 relative.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch
from mm_harness import IM_END, random_image

from fp4serve.chat_template import ChatTemplate
from fp4serve.config import EngineConfig
from fp4serve.engine.engine import Engine
from fp4serve.engine.request import Request
from fp4serve.engine.runner import ModelRunner
from fp4serve.engine.scheduler import ScheduledBatch, ScheduledRequest
from fp4serve.model.loader import load_model
from fp4serve.model.media import MediaConfig, image_item, preprocess_video
from fp4serve.model.multimodal import MultimodalPrompt, VisionTokenIds, build_multimodal_prompt, encode_media
from fp4serve.model.vision import load_vision_model
from fp4serve.sampling import SamplingParams
from fp4serve.tokenizer import Tokenizer

IDS = VisionTokenIds()
F32 = torch.float32


class LogitsTap:
    """Records, per request, the logits rows the runner samples from and the chunks it scheduled."""

    def __init__(self, engine: Engine) -> None:
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.chunks: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.mixed_steps = 0  # steps whose flat batch held more than one request
        runner = engine.runner
        execute, compute_logits = runner.execute, runner.model.compute_logits
        sampled: list[str] = []

        def tapped_execute(batch: Any) -> Any:
            sampled[:] = [e.request.request_id for e in batch.entries if e.sample]
            for e in batch.entries:
                self.chunks[e.request.request_id].append((e.start, e.start + e.num_tokens))
            self.mixed_steps += len(batch.entries) > 1
            return execute(batch)

        def tapped_logits(hidden: torch.Tensor) -> torch.Tensor:
            out = compute_logits(hidden)
            for rid, row in zip(sampled, out, strict=True):
                self.logits[rid].append(row.clone())
            return out

        runner.execute = tapped_execute
        runner.model.compute_logits = tapped_logits


@pytest.fixture(scope="module")
def prompts(checkpoints) -> dict[str, MultimodalPrompt]:
    path = checkpoints.fp32
    cfg = MediaConfig.from_dir(path)
    tokenizer = Tokenizer.from_dir(path)
    template = ChatTemplate.from_dir(path)

    def render(content: list[dict]) -> list[int]:
        return tokenizer.encode(template.render([{"role": "user", "content": content}], add_generation_prompt=True))

    images = [image_item(random_image(96, 64, seed=1), cfg), image_item(random_image(32, 128, seed=2), cfg)]
    assert [it.grid_thw for it in images] == [(1, 4, 6), (1, 8, 2)]
    frames = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    video = preprocess_video(frames, cfg)
    assert video.grid_thw == (2, 4, 4)
    image_ids = render([{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"},
                        {"type": "text", "text": "please."}])  # fmt: skip
    video_ids = render([{"type": "text", "text": "What happens in"}, {"type": "video"}])
    return {
        "image": build_multimodal_prompt(image_ids, images, [], ids=IDS, encode_text=tokenizer.encode),
        "video": build_multimodal_prompt(video_ids, [], [video], ids=IDS, encode_text=tokenizer.encode),
    }


def hf_logits(hf_model, mm: MultimodalPrompt, extra: list[int]) -> torch.Tensor:
    ids = torch.tensor([mm.token_ids + extra])
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == IDS.image] = 1
    types[ids == IDS.video] = 2
    kwargs: dict[str, Any] = {}
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        items = [it for it in mm.items if it.kind == kind]
        if items:
            kwargs[key] = torch.cat([it.pixel_values for it in items])
            kwargs[f"{kind}_grid_thw"] = torch.tensor([it.grid_thw for it in items])
    with torch.no_grad():
        return hf_model(input_ids=ids, mm_token_type_ids=types, **kwargs).logits[0]


def run(engine: Engine, requests: dict[str, tuple[MultimodalPrompt, SamplingParams]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for rid, (mm, params) in requests.items():
        engine.add_request(rid, mm.token_ids, params, mm_inputs=mm)
        out[rid] = []
    while engine.has_unfinished():
        for delta in engine.step():
            out[delta.request_id] += delta.new_token_ids
    return out


def cpu_config(**kwargs: Any) -> EngineConfig:
    defaults = dict(device="cpu", dtype="float32", block_size=16, max_num_seqs=4, max_model_len=256,
                    kv_cache_memory_bytes="64MiB")  # fmt: skip
    return EngineConfig.create(**(defaults | kwargs))


def make_engine(model, visual=None, **config: Any) -> Engine:
    return Engine(model, cpu_config(**config), eos_token_ids=(IM_END,), visual=visual, max_position_embeddings=4096)


def _inside_pads(mm: MultimodalPrompt, cut: int) -> bool:
    pads = set(mm.mm_token_positions.tolist())
    return cut - 1 in pads and cut in pads


def test_engine_logits_match_transformers(checkpoints, prompts):
    engine = Engine.from_pretrained(checkpoints.fp32, cpu_config(max_num_batched_tokens=7))
    assert engine.visual is not None and engine.visual.dtype == F32
    tap = LogitsTap(engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outputs = run(engine, {name: (mm, greedy) for name, mm in prompts.items()})
    assert tap.mixed_steps > 0, "the two requests were meant to share steps"
    assert engine.runner.num_held_features == 0
    for name, mm in prompts.items():
        cuts = [end for _, end in tap.chunks[name]]
        assert any(_inside_pads(mm, cut) for cut in cuts), f"{name}: no chunk boundary inside a placeholder run"
        generated = outputs[name]
        assert len(generated) == 3
        ref = hf_logits(checkpoints.hf_model, mm, generated[:-1])[mm.num_tokens - 1 :]
        ours = torch.stack(tap.logits[name])
        assert ours.shape == ref.shape
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-4, f"{name}: relative logits error {rel:.2e}"
        assert generated == ref.argmax(-1).tolist()


@pytest.fixture(scope="module")
def loaded(checkpoints):
    path = checkpoints.fp32
    return load_model(path, dtype=F32, progress=False), load_vision_model(path, dtype=F32)


def test_preempted_multimodal_requests_recompute_and_equal_alone(loaded, prompts):
    model, visual = loaded
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    requests = {f"{name}{i}": (mm, params) for i in range(2) for name, mm in prompts.items()}
    alone_engine = make_engine(model, visual, max_num_seqs=1)
    alone = {}
    for name, mm in prompts.items():
        alone[name] = run(alone_engine, {name: (mm, params)})[name]
    # 4 requests of 31-41 tokens, 4 KV blocks of 16 tokens: recomputation is unavoidable
    state = model.state_bytes_per_slot(F32) * 5
    budget = state + 4 * 16 * model.kv_bytes_per_token(F32)
    engine = make_engine(
        model, visual, max_num_seqs=4, max_num_batched_tokens=24, max_model_len=64, kv_cache_memory_bytes=budget
    )
    encoded: list[str] = []
    encode = engine.runner.encode_media

    def counting_encode(batch: Any) -> None:
        before = set(engine.runner._mm_features)
        encode(batch)
        encoded.extend(set(engine.runner._mm_features) - before)

    engine.runner.encode_media = counting_encode
    batched = run(engine, requests)
    assert engine.stats().num_preemptions > 0, "the cache was meant to be too small"
    assert len(encoded) > len(requests), "a preempted request mid-prefill encodes its media again"
    for rid, tokens in batched.items():
        assert tokens == alone[rid.rstrip("01")], rid
    stats = engine.stats()
    assert stats.used_kv_blocks == 0 and engine.runner.num_held_features == 0


def test_features_are_dropped_after_the_last_placeholder(loaded, prompts):
    model, visual = loaded
    engine = make_engine(model, visual, max_num_batched_tokens=8)
    mm = prompts["image"]
    engine.add_request("r", mm.token_ids, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                       mm_inputs=mm)  # fmt: skip
    last = int(mm.mm_token_positions[-1])
    held = []
    while engine.has_unfinished():
        engine.step()
        request = engine.scheduler.requests.get("r")
        if request is not None:
            held.append((request.num_computed_tokens, engine.runner.num_held_features))
    assert all(n == (0 < computed <= last) for computed, n in held), held


def test_engine_refuses_media_without_a_vision_tower(loaded, prompts):
    model, _ = loaded
    engine = make_engine(model)
    mm = prompts["image"]
    with pytest.raises(ValueError, match="no vision tower"):
        engine.add_request("r", mm.token_ids, SamplingParams(max_tokens=1), mm_inputs=mm)
    with pytest.raises(ValueError, match="expanded ids"):
        make_engine(model, loaded[1]).add_request("r", mm.token_ids[:-1], SamplingParams(max_tokens=1), mm_inputs=mm)


def test_encoder_groups_media_items_under_the_patch_budget(loaded, prompts):
    model, visual = loaded
    runner = ModelRunner(model, device=torch.device("cpu"), dtype=F32, block_size=16, visual=visual,
                         encoder_batch_patches=40)  # fmt: skip
    params = SamplingParams(max_tokens=1)
    requests = [Request(name, mm.token_ids, params, mm_inputs=mm) for name, mm in prompts.items()]
    calls: list[int] = []
    handle = visual.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    try:
        runner.encode_media(ScheduledBatch(tuple(ScheduledRequest(r, 0, r.num_tokens, False) for r in requests)))
        # images of 24 and 16 patch rows fill one call of 40; the video's 32 rows need a second
        assert calls == [(24 + 16) // 4, 32 // 4]
        for request in requests:
            alone = encode_media(visual, request.mm_inputs)
            torch.testing.assert_close(runner._mm_features[request.request_id], alone, rtol=1e-5, atol=1e-5)
        calls.clear()
        runner.profile_encoder()
        assert calls == [6 * 6 // 4]  # the largest square grid within 40 patches, in merge blocks
    finally:
        handle.remove()
