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
    g.add_argument("--kv-cache-prefault", action=argparse.BooleanOptionalAction, default=None,
                   help="commit the whole KV budget in memory at start, so an overcommitted host fails at start "
                   "rather than under load (default: on for serve, off for one-shot commands)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget of one step")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per physical core)")
    g.add_argument("--revision", default=None, help="hub revision")
    g.add_argument(
        "--quantize",
        default=None,
        choices=["int8", "int4", "none"],
        help="keep weights in int8 (per channel) or int4 (group-wise) in memory; default: a GGUF file keeps its own "
        "quantization when the dtype is 16-bit, other checkpoints stay float; none: never quantize",
    )
    g.add_argument("--one-level-from", type=_non_negative, default=16, metavar="N",
                   help="from N sequences in a step on, int4 and int8 layers on airun's CPU kernels quantize "
                   "activations to one int8 level, as llama.cpp does (faster under load, near-tied greedy tokens may "
                   "differ), instead of two; 0: always two (default 16)")
    lo = p.add_argument_group("LoRA adapters")
    lo.add_argument("--enable-lora", action="store_true", help="serve LoRA fine-tunes (implied by --lora)")
    lo.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                    help="a PEFT LoRA adapter folder requests can name as `lora` (repeatable)")
    lo.add_argument("--max-loras", type=int, default=8, help="adapters resident at once (default 8)")
    lo.add_argument("--max-lora-rank", type=int, default=32, help="largest adapter rank accepted (default 32)")
    add_data_dir_argument(lo)


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {n}")
    return n


def add_data_dir_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--data-dir", default=None,
                   help="where fine-tunes are kept (default: $AIRUN_DATA_DIR or ~/.local/share/airun)")


def parse_lora_modules(specs: list[str]) -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> ``{NAME: PATH}``; raises InvalidRequestError on a malformed or repeated NAME."""
    from airun.errors import InvalidRequestError

    modules: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidRequestError(f"--lora expects NAME=PATH, got {spec!r}")
        if name in modules:
            raise InvalidRequestError(f"--lora names {name!r} twice")
        modules[name] = path
    return modules


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model,
        dtype=ns.dtype,
        device=ns.device,
        max_model_len=ns.max_model_len,
        kv_cache_memory_gb=ns.kv_cache_memory_gb,
        kv_cache_prefault=bool(ns.kv_cache_prefault),
        block_size=ns.block_size,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        enable_prefix_caching=not ns.no_prefix_caching,
        threads=ns.threads,
        revision=ns.revision,
        quantize=ns.quantize,
        one_level_from=ns.one_level_from or None,
        enable_lora=bool(ns.enable_lora or ns.lora),
        max_loras=ns.max_loras,
        max_lora_rank=ns.max_lora_rank,
        lora_modules=parse_lora_modules(ns.lora),
        data_dir=ns.data_dir,
    )


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def cmd_generate(ns: argparse.Namespace) -> int:
    from airun.cli_chat import print_load_summary
    from airun.engine.llm_engine import LLMEngine
    from airun.sampling_params import SamplingParams

    engine = LLMEngine(engine_args_from(ns))
    print_load_summary(engine)
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


def cmd_finetune_create(ns: argparse.Namespace) -> int:
    """Like ``wrangler ai finetune create MODEL NAME FOLDER``: checks the folder's two adapter files, registers the
    fine-tune in the data directory, copies the files in and prints the record as JSON."""
    import json
    from pathlib import Path

    from airun.lora import ADAPTER_FILES, FinetuneRegistry, default_data_dir
    from airun.lora.adapter import check_weights_header, read_adapter_config

    folder = Path(ns.folder)
    reg = FinetuneRegistry(Path(ns.data_dir) if ns.data_dir else default_data_dir(), max_rank=ns.max_lora_rank)
    read_adapter_config(folder / "adapter_config.json", ns.max_lora_rank)  # refuse before anything is created
    check_weights_header(folder / "adapter_model.safetensors", reg.max_bytes)
    ft = reg.create(ns.model, ns.name, ns.description, ns.public)
    try:
        for f in ADAPTER_FILES:
            with open(folder / f, "rb") as src:
                ft = reg.put_asset(ft.id, f, src)
    except BaseException:
        reg.delete(ft.id)
        raise
    print(json.dumps(ft.to_json(), indent=2))
    return 0


def cmd_finetune_list(ns: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from airun.lora import FinetuneRegistry, default_data_dir

    reg = FinetuneRegistry(Path(ns.data_dir) if ns.data_dir else default_data_dir())
    print(json.dumps([f.to_json() for f in reg.list()], indent=2))
    return 0


def add_finetune_subcommands(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="manage LoRA fine-tunes in the data directory")
    ftsub = ft.add_subparsers(dest="finetune_command", required=True)
    create = ftsub.add_parser("create", help="register a PEFT LoRA adapter folder as a fine-tune")
    create.add_argument("model", help="the model it fine-tunes, e.g. @cf/mistral/mistral-7b-instruct-v0.2-lora")
    create.add_argument("name", help="the name requests use as `lora`")
    create.add_argument("folder", help="folder with adapter_config.json and adapter_model.safetensors")
    create.add_argument("--description", default="")
    create.add_argument("--public", action="store_true")
    create.add_argument("--max-lora-rank", type=int, default=32)
    add_data_dir_argument(create)
    create.set_defaults(func=cmd_finetune_create)
    ls = ftsub.add_parser("list", help="list the fine-tunes")
    add_data_dir_argument(ls)
    ls.set_defaults(func=cmd_finetune_list)


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

    from airun.cli_chat import add_subcommands

    add_subcommands(sub)  # chat, run
    add_finetune_subcommands(sub)

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
