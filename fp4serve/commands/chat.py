"""`fp4serve chat MODEL`: an interactive terminal chat that streams the model's reply token by token.

It drives the engine directly (no HTTP): each user line is appended to the conversation, rendered with the
checkpoint's chat template (thinking on unless `--no-think`), and generated with streaming text deltas. The reply is
split with the same qwen3 reasoning parser the server uses, so reasoning is shown dimmed (or prefixed when the
output is not a terminal) and only the answer goes back into the history, as the chat template expects.
Lines starting with `/` are commands: `/reset` clears the history, `/exit` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory (BF16 or ModelOpt NVFP4)")
    parser.add_argument("--no-think", action="store_true", help="disable thinking (enable_thinking=false)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    parser.add_argument("--temperature", type=float, default=None, help="default: generation_config.json")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-model-len", default=None, help="context length (default: the model's own)")
    parser.add_argument("--kv-cache-memory", default=None, help="cache budget, e.g. 512MiB")


def run(args: argparse.Namespace) -> int:
    from fp4serve.chat_template import ChatTemplate
    from fp4serve.config import EngineConfig
    from fp4serve.engine.engine import Engine
    from fp4serve.sampling import GenerationDefaults, SamplingParams

    engine_kwargs: dict[str, Any] = {"device": args.device, "max_num_seqs": 1}
    if args.max_model_len is not None:
        engine_kwargs["max_model_len"] = args.max_model_len
    if args.kv_cache_memory is not None:
        engine_kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory
    engine = Engine.from_pretrained(args.model, EngineConfig.create(**engine_kwargs))
    template = ChatTemplate.from_dir(args.model)
    defaults = GenerationDefaults.from_dir(args.model)
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    params = SamplingParams(
        max_tokens=args.max_tokens, seed=args.seed, **{k: v for k, v in given.items() if v is not None}
    ).with_defaults(defaults)
    session = ChatSession(engine, template, params, thinking=not args.no_think, system=args.system)
    return session.loop(sys.stdin, sys.stdout)


class ChatSession:
    """One conversation: history, rendering, and streaming of each reply to a text stream."""

    def __init__(self, engine: Any, template: Any, params: Any, *, thinking: bool, system: str | None) -> None:
        self.engine = engine
        self.template = template
        self.params = params
        self.thinking = thinking
        self.system = system
        self.messages: list[dict[str, str]] = []
        self._turns = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def loop(self, stdin: TextIO, out: TextIO) -> int:
        interactive = stdin.isatty()
        while True:
            if interactive:
                out.write("\n> ")
                out.flush()
            line = stdin.readline()
            if not line:
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                self.reset()
                out.write("(history cleared)\n")
                continue
            self.messages.append({"role": "user", "content": text})
            answer = self.reply(out, dim=out.isatty())
            self.messages.append({"role": "assistant", "content": answer})

    def reply(self, out: TextIO, *, dim: bool) -> str:
        """Generate and stream one assistant reply; returns the answer text (reasoning removed)."""
        from fp4serve.parsers import ChatStreamParser

        prompt = self.template.render(self.messages, add_generation_prompt=True, enable_thinking=self.thinking)
        prompt_ids = self.engine.tokenizer.encode(prompt)
        request_id = f"chat-{self._turns}"
        self._turns += 1
        self.engine.add_request(request_id, prompt_ids, self.params)
        parser = ChatStreamParser(tools=None, thinking=self.thinking)
        answer: list[str] = []
        in_reasoning = False
        try:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    fragments = parser.feed(delta.text or "")
                    if delta.finished:
                        fragments += parser.finish()
                    for fragment in fragments:
                        in_reasoning = _write_fragment(out, fragment, in_reasoning, dim, answer)
        except KeyboardInterrupt:
            self.engine.abort(request_id)
            while self.engine.has_unfinished():
                self.engine.step()
        if in_reasoning and dim:
            out.write("\033[0m")
        out.write("\n")
        out.flush()
        return "".join(answer).strip()


def _write_fragment(out: TextIO, fragment: dict[str, Any], in_reasoning: bool, dim: bool, answer: list[str]) -> bool:
    reasoning = fragment.get("reasoning")
    if reasoning:
        if not in_reasoning:
            out.write("\033[2m" if dim else "[thinking] ")
        out.write(reasoning)
        out.flush()
        return True
    content = fragment.get("content")
    if content:
        if in_reasoning:
            out.write("\033[0m\n" if dim else "\n[answer] ")
        out.write(content)
        out.flush()
        answer.append(content)
        return False
    return in_reasoning
