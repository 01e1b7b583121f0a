"""Checkpoint reading/writing: sharded round trip, index layout, atomic writes, and a clear error per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fp4serve.checkpoint.atomic import write_json_atomic
from fp4serve.checkpoint.safetensors_io import INDEX_FILE, CheckpointReader, ShardedWriter, save_checkpoint
from fp4serve.checkpoint.validate import validate_nvfp4_tensors
from fp4serve.quant.nvfp4 import quantize_weight


def sample_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    q = quantize_weight(torch.randn(32, 64, generator=g))
    tensors = [(f"model.layers.{i}.norm.weight", torch.randn(64, generator=g).bfloat16()) for i in range(6)]
    tensors += [
        ("model.layers.0.mlp.up_proj.weight", q.weight),
        ("model.layers.0.mlp.up_proj.weight_scale", q.weight_scale),
        ("model.layers.0.mlp.up_proj.weight_scale_2", q.weight_scale_2),
        ("model.layers.0.mlp.up_proj.input_scale", torch.tensor(0.01)),
        ("model.embed_tokens.weight", torch.randn(40, 64, generator=g).half()),
        ("steps", torch.arange(5)),
    ]
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 else torch.equal(a, b)


def test_sharded_round_trip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    files = save_checkpoint(tmp_path, tensors, max_shard_bytes=600)
    assert len(files) > 3
    assert [f.name for f in files][0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for _, t in tensors)
    assert set(index["weight_map"]) == {n for n, _ in tensors}
    assert set(index["weight_map"].values()) == {f.name for f in files}
    reader = CheckpointReader(tmp_path)
    assert reader.names() == sorted(n for n, _ in tensors)
    for name, t in tensors:
        assert reader.dtype(name) == t.dtype and reader.shape(name) == tuple(t.shape)
        assert same_bits(reader.get(name), t)
    shards = reader.shards()
    assert [p for p, _ in shards] == files
    # shard by shard, every tensor exactly once, each shard in the order it was written
    assert sorted(n for _, names in shards for n in names) == reader.names()
    assert shards[0][1] == [n for n, _ in tensors[: len(shards[0][1])]]
    assert not list(tmp_path.glob(".*"))


def test_single_shard_replaces_an_older_sharded_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, sample_tensors(), max_shard_bytes=600)
    save_checkpoint(tmp_path, [("a", torch.ones(3))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert CheckpointReader(tmp_path).names() == ["a"]


def test_writer_handles_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.randn(8, 16)
    with ShardedWriter(tmp_path) as writer:
        writer.add("embed", base)
        writer.add("tied", base)
        writer.add("row", base[2])
        with pytest.raises(ValueError, match="added twice"):
            writer.add("embed", base)
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.get("tied"), base) and torch.equal(reader.get("row"), base[2])


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, [("a", torch.ones(3))])
    before = (tmp_path / "model.safetensors").read_bytes()
    sparse = torch.eye(4).to_sparse()

    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises for a sparse tensor
        # "b" is already staged in its own shard when "c" fails
        save_checkpoint(tmp_path, [("b", torch.zeros(2)), ("b2", torch.zeros(2)), ("c", sparse)], max_shard_bytes=4)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "x.json", {"a": object()})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "x.json"]


def test_missing_shard_is_named(tmp_path: Path) -> None:
    files = save_checkpoint(tmp_path, sample_tensors(), max_shard_bytes=600)
    files[1].unlink()
    with pytest.raises(ValueError, match=f"refers to shard {files[1].name}, which does not exist"):
        CheckpointReader(tmp_path)


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    files = save_checkpoint(tmp_path, sample_tensors(), max_shard_bytes=600)
    data = files[2].read_bytes()
    files[2].write_bytes(data[:-7])
    with pytest.raises(ValueError, match=f"{files[2].name} is truncated"):
        CheckpointReader(tmp_path)
    files[2].write_bytes(data[:5])
    with pytest.raises(ValueError, match=f"{files[2].name} is truncated"):
        CheckpointReader(tmp_path)
    files[2].write_bytes(data[:40])
    with pytest.raises(ValueError, match=f"{files[2].name} is truncated"):
        CheckpointReader(tmp_path)


def test_corrupt_header_and_bad_index_entries(tmp_path: Path) -> None:
    save_file({"x": torch.ones(4)}, tmp_path / "model.safetensors")
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[8] = ord("#")
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors has a corrupt safetensors header"):
        CheckpointReader(tmp_path)
    save_file({"x": torch.ones(4)}, tmp_path / "model.safetensors")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"y": "model.safetensors"}}))
    with pytest.raises(ValueError, match="puts tensor y in model.safetensors, which does not hold it"):
        CheckpointReader(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"checkpoint index .*{INDEX_FILE} is unreadable"):
        CheckpointReader(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has neither model.safetensors nor"):
        CheckpointReader(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")


def test_reads_the_shared_bf16_fixture_headers(shared_dir: Path) -> None:
    reader = CheckpointReader(shared_dir / "fixtures" / "austen-qwen35-tiny")
    assert "model.embed_tokens.weight" in reader.names()
    assert reader.dtype("model.norm.weight") == torch.bfloat16
    assert reader.get("model.norm.weight").shape == reader.shape("model.norm.weight")


def test_validate_nvfp4_tensors_names_each_problem(tmp_path: Path) -> None:
    prefix = "model.layers.0.mlp.up_proj"
    tensors = dict(sample_tensors())
    save_checkpoint(tmp_path, tensors.items())
    reader = CheckpointReader(tmp_path)
    for source in (tensors, reader):
        validate_nvfp4_tensors(prefix, source, 32, 64, require_input_scale=True)
    with pytest.raises(
        ValueError, match=rf"{prefix}.weight is torch.uint8 \[32, 32\], expected torch.uint8 \[16, 32\]"
    ):
        validate_nvfp4_tensors(prefix, reader, 16, 64)
    bad = dict(tensors)
    bad[f"{prefix}.weight_scale"] = bad[f"{prefix}.weight_scale"].float()
    del bad[f"{prefix}.input_scale"]
    bad[f"{prefix}.weight_scale_2"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError) as info:
        validate_nvfp4_tensors(prefix, bad, 32, 64, require_input_scale=True)
    message = str(info.value)
    assert f"{prefix}.weight_scale is torch.float32 [32, 4], expected torch.float8_e4m3fn [32, 4]" in message
    assert f"{prefix}.input_scale is missing" in message
    assert f"{prefix}.weight_scale_2 = nan is not a valid scale" in message
    # W4A16 checkpoints have no input_scale, which is fine unless the caller needs one
    validate_nvfp4_tensors(prefix, {k: v for k, v in tensors.items() if "input_scale" not in k}, 32, 64)
    with pytest.raises(ValueError, match="not a multiple of the NVFP4 block size"):
        validate_nvfp4_tensors(prefix, tensors, 32, 60)
