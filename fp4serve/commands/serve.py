"""`fp4serve serve [MODEL]`: the OpenAI-compatible HTTP server, a drop-in for `vllm serve`.

The flags are vLLM's names and meanings, so a `vllm serve` line from a model card runs unchanged. Every flag is
either honoured or checked: values fp4serve cannot do (another tool parser, tensor parallelism > 1, a quantization
method the checkpoint does not use) stop the start-up with a clear error instead of being ignored. With no MODEL
the bundled demo model is served, with the tool and reasoning parsers switched on. Heavy imports (torch, the
engine) happen inside `run`, so `fp4serve --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fp4serve.config import EngineConfig
from fp4serve.server.settings import MAX_LOGPROBS, SUPPORTED_REASONING_PARSERS, SUPPORTED_TOOL_PARSERS, ServerSettings

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
DEMO_SERVED_NAME = "fp4serve-demo"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SUPPORTED_QUANTIZATION = ("modelopt", "modelopt_fp4")
DTYPE_ALIASES = {"bf16": "bfloat16", "half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="checkpoint directory (BF16 or ModelOpt NVFP4); default: the bundled demo model",
    )
    parser.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model id(s) clients use; the first is reported in responses (default: MODEL)",
    )
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")

    engine = parser.add_argument_group("engine and memory")
    engine.add_argument(
        "--max-model-len",
        default=None,
        help="context length: an integer, 32k (=32000), 32K (=32768), or -1/auto = the longest "
        "that fits in the cache memory (default: the model's own)",
    )
    engine.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="share of the GPU's total memory this server may use (default 0.9)",
    )
    engine.add_argument(
        "--kv-cache-memory",
        "--kv-cache-memory-bytes",
        dest="kv_cache_memory",
        default=None,
        help="cache memory budget, e.g. 2GiB or 500M; required sizing on CPU, overrides "
        "--gpu-memory-utilization on GPU",
    )
    engine.add_argument("--max-num-seqs", type=int, default=None, help="most sequences decoded together")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    engine.add_argument(
        "--max-waiting-requests",
        type=int,
        default=512,
        help="requests allowed to wait for the engine; more get HTTP 503 (default 512, 0 = no limit)",
    )
    engine.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    engine.add_argument("--dtype", default="auto", help="activation dtype: auto (bfloat16), bfloat16, float16, float32")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="only 1 is supported")
    engine.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="only 1 is supported")
    engine.add_argument(
        "--quantization",
        "-q",
        default=None,
        help="modelopt or modelopt_fp4: checked against the checkpoint (default: from the checkpoint)",
    )
    engine.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for vLLM compatibility; not needed, fp4serve runs no checkpoint code",
    )
    engine.add_argument(
        "--seed", type=int, default=None, help="seed of the engine's sampler for requests without their own"
    )

    api = parser.add_argument_group("OpenAI API behaviour")
    api.add_argument("--enable-auto-tool-choice", action="store_true", help="parse tool calls from model output")
    api.add_argument("--tool-call-parser", default=None, help=f"one of: {', '.join(SUPPORTED_TOOL_PARSERS)}")
    api.add_argument("--reasoning-parser", default=None, help=f"one of: {', '.join(SUPPORTED_REASONING_PARSERS)}")
    api.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS, help="cap on top_logprobs (default 20)")
    api.add_argument(
        "--generation-config",
        default="auto",
        help="auto: request defaults from the model's generation_config.json; vllm: built-in defaults",
    )
    api.add_argument(
        "--allow-http-media", action="store_true", help="let requests fetch images and videos from http(s) URLs"
    )
    api.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="let requests read images and videos from files under DIR (paths or file:// URLs)",
    )
    api.add_argument("--enable-force-include-usage", action="store_true", help="usage on every streamed response")
    api.add_argument(
        "--exclude-tools-when-tool-choice-none",
        action="store_true",
        help="do not render tools into the prompt when tool_choice is none",
    )
    api.add_argument("--disable-log-requests", action="store_true", help="accepted for vLLM compatibility")
    api.add_argument("--disable-log-stats", action="store_true", help="accepted for vLLM compatibility")
    api.add_argument(
        "--uvicorn-log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace")
    )


def resolve_model_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The checkpoint directory and whether it is the bundled demo."""
    if args.model is not None and args.model_flag is not None and args.model != args.model_flag:
        raise ValueError(f"MODEL given twice with different values: {args.model!r} and --model {args.model_flag!r}")
    given = args.model or args.model_flag
    if given is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ValueError(
                f"the bundled demo model is missing: {DEMO_MODEL_DIR} has no config.json; "
                "pass a checkpoint directory as MODEL"
            )
        return DEMO_MODEL_DIR, True
    path = Path(given).expanduser()
    if not path.exists() and HUB_ID.fullmatch(given):
        path = hub_snapshot(given)
    if not path.is_dir():
        raise ValueError(f"MODEL {given!r} is not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"MODEL {given!r} has no config.json")
    return path, False


def hub_snapshot(repo_id: str) -> Path:
    """A Hugging Face Hub id (as on model cards): the local snapshot, downloaded first if it is not cached."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ValueError(
            f"MODEL {repo_id!r} is not a local directory; install huggingface_hub to fetch it from the Hub, "
            "or pass the checkpoint directory"
        ) from exc
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        print(f"fp4serve serve: {repo_id} is not in the Hub cache; downloading it")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ValueError(f"MODEL {repo_id!r}: not a local directory and not downloadable from the Hub ({exc})") from exc


def checkpoint_quant_algo(model_dir: Path) -> str | None:
    """The checkpoint's ModelOpt quant_algo (hf_quant_config.json or config.json), None for a BF16 checkpoint."""
    hf_quant = model_dir / "hf_quant_config.json"
    if hf_quant.is_file():
        algo = json.loads(hf_quant.read_text()).get("quantization", {}).get("quant_algo")
        if algo:
            return str(algo)
    block = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    algo = block.get("quant_algo")
    return str(algo) if algo else None


def check_quantization(method: str | None, model_dir: Path) -> None:
    if method is None:
        return
    if method not in SUPPORTED_QUANTIZATION:
        raise ValueError(
            f"--quantization {method!r} is not supported; fp4serve serves ModelOpt NVFP4 checkpoints "
            f"({', '.join(SUPPORTED_QUANTIZATION)}) and unquantized BF16 ones (leave --quantization out)"
        )
    algo = checkpoint_quant_algo(model_dir)
    if algo is None:
        raise ValueError(
            f"--quantization {method}: {model_dir} is not a ModelOpt-quantized checkpoint "
            "(no quant_algo in hf_quant_config.json or config.json)"
        )
    if "NVFP4" not in algo.upper():
        raise ValueError(f"--quantization {method}: the checkpoint's quant_algo is {algo!r}; only NVFP4 is supported")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's config from the flags the user set (the rest keep EngineConfig's defaults), validated."""
    if args.tensor_parallel_size != 1:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size}: only 1 is supported in this version")
    if args.pipeline_parallel_size != 1:
        raise ValueError(f"--pipeline-parallel-size {args.pipeline_parallel_size}: only 1 is supported")
    kwargs: dict = {
        "device": args.device,
        "dtype": DTYPE_ALIASES.get(args.dtype, args.dtype),
        "enforce_eager": args.enforce_eager,
    }
    optional = {
        "max_model_len": args.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_memory_bytes": args.kv_cache_memory,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "seed": args.seed,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    try:
        return EngineConfig.create(**kwargs)
    except ValueError as exc:
        # name the flag the user typed, not the config field
        field = str(exc).split(":", 1)[0]
        flag = {"kv_cache_memory_bytes": "kv-cache-memory"}.get(field, field.replace("_", "-"))
        raise ValueError(f"--{flag}: {str(exc).split(':', 1)[-1].strip()}") from exc


def build_settings(args: argparse.Namespace, model_dir: Path, is_demo: bool) -> ServerSettings:
    from fp4serve import __version__

    if args.generation_config not in ("auto", "vllm"):
        raise ValueError(f"--generation-config {args.generation_config!r}: use auto or vllm")
    names = tuple(args.served_model_name or ((DEMO_SERVED_NAME,) if is_demo else (args.model or args.model_flag,)))
    tool_parser = args.tool_call_parser
    reasoning_parser = args.reasoning_parser
    auto_tools = args.enable_auto_tool_choice
    if is_demo:
        # the demo shows the whole API: tools and reasoning are on unless the user chose otherwise
        tool_parser = tool_parser or "qwen3_coder"
        reasoning_parser = reasoning_parser or "qwen3"
        auto_tools = True
    return ServerSettings(
        served_model_names=names,
        model_root=str(model_dir),
        api_key=args.api_key,
        enable_auto_tool_choice=auto_tools,
        tool_call_parser=tool_parser,
        reasoning_parser=reasoning_parser,
        max_waiting_requests=args.max_waiting_requests or None,
        max_logprobs=args.max_logprobs,
        allow_http_media=args.allow_http_media,
        allowed_local_media_path=args.allowed_local_media_path,
        enable_force_include_usage=args.enable_force_include_usage,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        version=__version__,
    )


def prepare(args: argparse.Namespace) -> tuple[Path, ServerSettings, EngineConfig]:
    """Validate the whole command line before anything heavy is loaded."""
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_waiting_requests is not None and args.max_waiting_requests < 0:
        raise ValueError(f"--max-waiting-requests must be >= 0, got {args.max_waiting_requests}")
    model_dir, is_demo = resolve_model_dir(args)
    check_quantization(args.quantization, model_dir)
    config = engine_config(args)
    settings = build_settings(args, model_dir, is_demo)
    return model_dir, settings, config


def run(args: argparse.Namespace) -> int:
    model_dir, settings, config = prepare(args)
    from fp4serve.server.launch import serve_forever

    serve_forever(
        model_dir,
        settings,
        config,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        use_generation_config=args.generation_config == "auto",
    )
    return 0
