"""`quantize_checkpoint`: BF16 Qwen3.5 checkpoint + calibration text -> ModelOpt-format NVFP4 checkpoint.

Order of work, chosen so that bad input fails before anything is written and memory stays at one layer:
1. plan from config + headers (`plan.py`), tokenize the calibration text into windows (`calib_data.py`), create the
   staging directory (`export.OutputStage`);
2. embed the windows (only the rows they use are kept) into hidden states [W, L, hidden] on the device;
3. for each decoder layer: build it from the source shards, run the windows through it while hooks record each
   input group's amax (and X^T X for `mse`/`gptq`), quantize its Linears (fused groups share `weight_scale_2` and
   `input_scale`), write its tensors, and move the hidden states on. `max` moves them on with the BF16 layer, as
   ModelOpt calibrates; the other algorithms re-run the layer with its quantized weights, so every layer is fitted
   to the inputs it will really see (GPTQ's sequential mode);
4. the token embedding (NVFP4 only with `quantize_embedding`; when tied, it is fitted as the lm_head to the final
   normed hidden states), the pass-through tensors, the metadata files; then the stage is renamed into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fp4serve import __version__
from fp4serve.checkpoint.quant_config import QuantConfig
from fp4serve.checkpoint.safetensors_io import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, ShardedWriter
from fp4serve.model.qwen3_5 import RMSNorm
from fp4serve.quant.algorithms import AlgorithmConfig, quantize
from fp4serve.quant.calib_data import TokenWindows, token_windows
from fp4serve.quant.export import OutputStage, copy_side_files, write_quant_metadata
from fp4serve.quant.layerwise import LayerRunner, StatsRecorder, build_layer, load_layer
from fp4serve.quant.nvfp4 import NVFP4Weight, dequantize_weight, global_scale_from_amax, input_scale_from_amax
from fp4serve.quant.plan import CheckpointPlan, make_plan
from fp4serve.quant.recipe import QuantRecipe
from fp4serve.tokenizer import Tokenizer

PRODUCER = {"name": "fp4serve", "version": __version__}


@dataclass(frozen=True)
class QuantizeOptions:
    model: Path
    output: Path
    calib_data: tuple[Path, ...]
    recipe: QuantRecipe
    algorithm: AlgorithmConfig
    calib_samples: int = 256
    calib_seq_len: int = 512
    overwrite: bool = False
    device: str = "auto"
    calib_dtype: torch.dtype | None = None  # None: float32 on CPU, bfloat16 on GPU
    batch_tokens: int = 8192
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    progress: bool = True


@dataclass
class QuantizeSummary:
    output: Path
    windows: TokenWindows
    quantized: list[str] = field(default_factory=list)  # checkpoint module names
    kept: list[str] = field(default_factory=list)  # unquantized modules (Linears, conv1d, embedding, vision, ...)
    bytes_before: dict[str, int] = field(default_factory=lambda: {"nvfp4": 0, "kept": 0})
    bytes_after: dict[str, int] = field(default_factory=lambda: {"nvfp4": 0, "kept": 0})
    seconds: float = 0.0

    def table(self) -> str:
        def mb(n: int) -> str:
            return f"{n / 1e6:,.2f} MB"

        rows = [
            ("quantized (NVFP4)", len(self.quantized), self.bytes_before["nvfp4"], self.bytes_after["nvfp4"]),
            ("kept (unchanged)", len(self.kept), self.bytes_before["kept"], self.bytes_after["kept"]),
        ]
        total_before = sum(self.bytes_before.values())
        total_after = sum(self.bytes_after.values())
        rows.append(("total", len(self.quantized) + len(self.kept), total_before, total_after))
        lines = [f"{'':<20}{'modules':>10}{'bytes before':>16}{'bytes after':>16}"]
        lines += [f"{a:<20}{b:>10}{mb(c):>16}{mb(d):>16}" for a, b, c, d in rows]
        ratio = total_before / total_after if total_after else float("inf")
        lines.append(f"compression {ratio:.2f}x in {self.seconds:.1f} s; written to {self.output}")
        return "\n".join(lines)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Exporter:
    """Streams tensors into the staging directory's shards and keeps the byte accounting."""

    def __init__(self, writer: ShardedWriter, summary: QuantizeSummary) -> None:
        self.writer = writer
        self.summary = summary

    def keep(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)
        self.summary.bytes_before["kept"] += _nbytes(tensor)
        self.summary.bytes_after["kept"] += _nbytes(tensor)

    def quantized(self, module: str, source: torch.Tensor, q: NVFP4Weight, input_scale: torch.Tensor | None) -> None:
        tensors = {"weight": q.weight, "weight_scale": q.weight_scale, "weight_scale_2": q.weight_scale_2}
        if input_scale is not None:
            tensors["input_scale"] = input_scale
        for leaf, tensor in tensors.items():
            tensor = tensor.detach().cpu().contiguous()
            self.writer.add(f"{module}.{leaf}", tensor)
            self.summary.bytes_after["nvfp4"] += _nbytes(tensor)
        self.summary.bytes_before["nvfp4"] += _nbytes(source)
        self.summary.quantized.append(module)


def quantize_checkpoint(options: QuantizeOptions, log: Callable[[str], None] = print) -> QuantizeSummary:
    """Run the whole quantization (see the module docstring); ValueError on bad input, nothing written then."""
    started = time.monotonic()
    if options.calib_samples < 1:
        raise ValueError(f"--calib-samples must be at least 1, got {options.calib_samples}")
    if options.batch_tokens < 1:
        raise ValueError(f"calibration batch size must be at least 1 token, got {options.batch_tokens}")
    plan = make_plan(options.model, options.recipe)
    model_dir = plan.path.resolve()
    output = options.output.absolute()
    if output.resolve() == model_dir or model_dir.is_relative_to(output.resolve()):
        raise ValueError(f"output {output} would overwrite the source model {model_dir}")
    device = resolve_device(options.device)
    dtype = options.calib_dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    tokenizer = Tokenizer.from_dir(plan.path)
    windows = token_windows(tokenizer, options.calib_data, options.calib_seq_len, options.calib_samples)
    log(f"calibration data: {windows.describe()}")
    if int(windows.tokens.max()) >= plan.config.vocab_size:
        raise ValueError("the tokenizer produced ids beyond the model's vocab_size: wrong tokenizer for this model")

    stage = OutputStage(output, overwrite=options.overwrite)
    try:
        summary = QuantizeSummary(output=output, windows=windows)
        metadata = {
            "fp4serve_quantize": (
                f"recipe={options.recipe.name} algorithm={options.algorithm.name} "
                f"calib={windows.num_windows}x{windows.seq_len} quantize_embedding={plan.quantize_embedding}"
            )
        }
        writer = ShardedWriter(stage.path, max_shard_bytes=options.max_shard_bytes, metadata=metadata)
        with CheckpointReader(plan.path) as reader:
            exporter = _Exporter(writer, summary)
            _quantize_model(plan, reader, windows, options, exporter, device, dtype)
            for name in tqdm(plan.passthrough, desc="Export", unit="tensor", disable=not options.progress):
                exporter.keep(name, reader.get(name))
        writer.close()
        quant = QuantConfig(quant_algo="NVFP4", exclude_modules=plan.exclude_modules, producer=dict(PRODUCER))
        write_quant_metadata(plan.path, stage.path, quant, nvfp4_embed=plan.quantize_embedding)
        copy_side_files(plan.path, stage.path)
        stage.commit()
    finally:
        stage.discard()
    summary.kept = list(plan.kept_modules)
    summary.seconds = time.monotonic() - started
    return summary


def _quantize_model(
    plan: CheckpointPlan,
    reader: CheckpointReader,
    windows: TokenWindows,
    options: QuantizeOptions,
    exporter: _Exporter,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    config = plan.config
    algorithm = options.algorithm
    embed = reader.get(plan.embed_name + ".weight")
    hidden = embed[windows.tokens].to(device=device, dtype=dtype)  # [W, L, H]
    del embed
    sequential = algorithm.name != "max"
    per_batch = max(1, options.batch_tokens // windows.seq_len)
    runner = LayerRunner(config, per_batch)
    batches = -(-windows.num_windows // per_batch)
    passes = 2 if sequential else 1
    bar = tqdm(
        total=config.num_hidden_layers * batches * passes,
        desc=f"Calibrate+quantize ({algorithm.name})",
        unit="batch",
        disable=not options.progress,
    )
    for layer_plan in plan.layers:
        bar.set_postfix_str(f"layer {layer_plan.index + 1}/{config.num_hidden_layers}")
        layer = build_layer(config, layer_plan.index, dtype, device)
        source = load_layer(layer, reader, layer_plan.prefix)
        recorder = StatsRecorder(want_hessian=algorithm.needs_hessian)
        for group in layer_plan.groups:
            recorder.attach(layer.get_submodule(group[0]), group[0])
        runner.run(layer, layer_plan.index, hidden, write_back=not sequential, on_batch=lambda _: bar.update(1))
        recorder.detach()
        quantized_tensors: set[str] = set()
        for group in layer_plan.groups:
            stats = recorder.stats[group[0]]
            if not float(stats.amax) > 0:
                raise ValueError(f"{layer_plan.prefix + group[0]} saw only zero inputs during calibration")
            input_scale = input_scale_from_amax(stats.amax)
            weights = [source[f"{m}.weight"] for m in group]
            ws2 = global_scale_from_amax(torch.stack([w.abs().amax().float() for w in weights]).amax())
            # the members share the input (one Hessian) and the global scale, and every algorithm treats rows
            # independently, so the group is quantized as one stacked weight: same result, far fewer GPTQ steps
            names = ", ".join(layer_plan.prefix + m for m in group)
            stacked = quantize(torch.cat(weights).to(device), ws2, algorithm, stats.hessian, name=names)
            start = 0
            for member, w in zip(group, weights, strict=True):
                rows = slice(start, start + w.shape[0])
                start = rows.stop
                q = NVFP4Weight(stacked.weight[rows], stacked.weight_scale[rows], stacked.weight_scale_2)
                exporter.quantized(layer_plan.prefix + member, w, q, input_scale)
                quantized_tensors.add(f"{member}.weight")
                if sequential:
                    deq = dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2, dtype=dtype)
                    layer.get_submodule(member).weight.data.copy_(deq)
        recorder.stats.clear()
        if sequential:
            runner.run(layer, layer_plan.index, hidden, write_back=True, on_batch=lambda _: bar.update(1))
        for local in layer_plan.tensors:
            if local not in quantized_tensors:
                exporter.keep(layer_plan.prefix + local, source[local])
        del layer, source
    bar.close()
    if plan.quantize_embedding:
        _quantize_embedding(plan, reader, hidden, algorithm, exporter, device, dtype)


@torch.no_grad()
def _quantize_embedding(
    plan: CheckpointPlan,
    reader: CheckpointReader,
    hidden: torch.Tensor,
    algorithm: AlgorithmConfig,
    exporter: _Exporter,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """NVFP4 token embedding; tied to the lm_head, its Hessian is that of the final normed hidden states."""
    config = plan.config
    hessian = None
    if algorithm.needs_hessian and config.tie_word_embeddings:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        norm.weight.copy_(reader.get(plan.norm_name))
        hessian = torch.zeros(config.hidden_size, config.hidden_size, device=device)
        for window in hidden:
            x = norm(window).float()  # [L, H]
            hessian += x.T @ x
    embed = reader.get(plan.embed_name + ".weight")
    ws2 = global_scale_from_amax(embed.abs().amax().float())
    q = quantize(embed.to(device), ws2, algorithm, hessian, name=plan.embed_name)
    exporter.quantized(plan.embed_name, embed, q, None)
