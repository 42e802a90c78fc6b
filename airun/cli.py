"""The ``airun`` command line: generate, serve, run, chat."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid

from airun.engine.args import EngineArgs


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="local HF folder, .gguf file or hub id (default: the demo model)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--max-model-len", type=int, default=None, help="context window allowed (prompt + max_tokens)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV-cache memory budget in GiB (default 2)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget of one step")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per physical core)")
    g.add_argument("--revision", default=None, help="hub revision")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model,
        dtype=ns.dtype,
        device=ns.device,
        max_model_len=ns.max_model_len,
        kv_cache_memory_gb=ns.kv_cache_memory_gb,
        block_size=ns.block_size,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        enable_prefix_caching=not ns.no_prefix_caching,
        threads=ns.threads,
        revision=ns.revision,
    )


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def cmd_generate(ns: argparse.Namespace) -> int:
    from airun.engine.llm_engine import LLMEngine
    from airun.sampling_params import SamplingParams

    engine = LLMEngine(engine_args_from(ns))
    tok = engine.tokenizer
    ids = tok.encode(ns.prompt) if ns.raw else tok.apply_chat_template([{"role": "user", "content": ns.prompt}])
    sp = SamplingParams(
        max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed
    )
    engine.add_request(uuid.uuid4().hex, ids, sp)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finished:
                sys.stdout.write("\n")
                print(
                    f"[{out.num_prompt_tokens} prompt tokens, {out.num_output_tokens} generated, "
                    f"finish: {out.finish_reason}]",
                    file=sys.stderr,
                )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airun", description="A self-hosted Workers AI.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion and stream it to standard output")
    add_engine_arguments(gen)
    _sampling_arguments(gen)
    gen.add_argument("--raw", action="store_true", help="send the prompt to the tokenizer as is (no chat template)")
    gen.add_argument("prompt")
    gen.set_defaults(func=cmd_generate)

    try:
        from airun.server import serve
    except ImportError:
        serve = None
    if serve is not None:
        srv = sub.add_parser("serve", help="serve the Workers AI and OpenAI-compatible HTTP APIs")
        serve.add_arguments(srv)
        srv.set_defaults(func=serve.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(ns.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from airun.errors import AirunError

    try:
        return int(ns.func(ns) or 0)
    except AirunError as exc:
        print(f"airun: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
