"""The ``megrez`` command line.

    megrez generate "你好" --model DIR_OR_HUB_ID       one completion (chat template applied)
    megrez chat --model DIR_OR_HUB_ID                 interactive, streaming; /reset, /exit
    megrez info DIR_OR_HUB_ID                         layer layout, parameters, memory
    megrez create-tiny OUT --arch moe|dense           a small random checkpoint

Without ``--model``, the default model is used (see ``megrez.llm.default_model``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .engine.offload import format_bytes
from .engine.sampling import SamplingParams


def add_model_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    g = p.add_argument_group("model")
    if model_optional:
        g.add_argument("--model", "-m", default=None,
                       help="checkpoint directory or Hugging Face hub id (default: the bundled/tiny model)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: float32 on CPU, the checkpoint's dtype on GPU)")
    g.add_argument("--router-bias", default=None, choices=["own", "owner", "none"],
                   help="Megrez2: whose e_score_correction_bias each layer selects experts with "
                        "(own = llama.cpp; owner = SGLang demo; none = vLLM with the official patch)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length to allocate (default: model's)")
    g.add_argument("--gpu-memory-budget", default=None, metavar="SIZE",
                   help="Megrez2: device memory to use (e.g. 6GiB); routed experts stay in host memory and "
                        "are cached on the device, prefetched from the pre-gate")
    g.add_argument("--offload-policy", default="group", choices=["group", "lru"],
                   help="expert cache eviction policy with --gpu-memory-budget (default: group)")
    g.add_argument("--no-prefetch", action="store_true", help="with --gpu-memory-budget: load experts on demand")
    g.add_argument("--verbose", "-v", action="store_true", help="print speed and expert-cache statistics to stderr")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for tensor ops (default: one per core). On a machine shared with other busy "
                        "processes, set it to the free cores: oversubscribed threads slow decoding several times")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: generation_config.json, else built-in defaults)")
    g.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=None)
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 means greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(a) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop).validate()


def make_llm(a, max_num_seqs: int = 1, kv_cache_memory: int | None = None, **engine_options):
    import torch

    from .llm import LLM

    if a.threads is not None:
        if a.threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(a.threads)
    return LLM(a.model, device=a.device, dtype=a.dtype, router_bias=a.router_bias, max_model_len=a.max_model_len,
               max_num_seqs=max_num_seqs, kv_cache_memory=kv_cache_memory, gpu_memory_budget=a.gpu_memory_budget,
               offload_policy=a.offload_policy, prefetch=not a.no_prefetch, **engine_options)


def report(llm, a, seconds: float) -> None:
    """--verbose: speed of the last request and the expert cache's statistics."""
    if not a.verbose:
        return
    req = getattr(llm, "last_request", None)
    if req is not None and req.first_token_time is not None:
        n = len(req.output_ids)
        decode = time.monotonic() - req.first_token_time
        print(f"[{len(req.prompt_ids)} prompt tokens, {n} generated in {seconds:.2f}s; time to first token "
              f"{req.first_token_time - req.arrival:.3f}s, decode {max(n - 1, 0) / max(decode, 1e-9):.1f} tokens/s]",
              file=sys.stderr)
    if llm.offload is not None:
        s = llm.offload.stats
        print(f"[expert cache: {s['slots']} slots ({format_bytes(s['cache_bytes'])}), hit rate {s['hit_rate']:.1%}, "
              f"prefetched {s['prefetched']}, on demand {s['misses']}, copied {format_bytes(s['bytes_copied'])}, "
              f"copy time {s['copy_seconds']:.3f}s of which exposed {s['copy_seconds_exposed']:.3f}s]",
              file=sys.stderr)


def read_constraint(a) -> dict:
    """--json-schema (inline JSON or a file) / --grammar (a Lark or GBNF file) as keyword
    arguments for LLM.generate/stream."""
    from pathlib import Path

    if a.json_schema is not None and a.grammar is not None:
        raise ValueError("give --json-schema or --grammar, not both")
    def read(flag, path):
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag}: cannot read {path} ({e})") from None

    if a.json_schema is not None:
        text = a.json_schema
        if not text.lstrip().startswith(("{", "true", "false")):
            text = read("--json-schema", text)
        try:
            return {"json_schema": json.loads(text)}
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema: not valid JSON ({e})") from None
    if a.grammar is not None:
        return {"grammar": read("--grammar", a.grammar)}
    return {}


def cmd_generate(a) -> int:
    params = sampling_from_args(a)
    constraint = read_constraint(a)
    if a.prompt_ids is not None and a.prompt is not None:
        raise ValueError("give either PROMPT or --prompt-ids, not both")
    if a.prompt_ids is None and a.prompt is None:
        if sys.stdin.isatty():
            raise ValueError("no prompt: give PROMPT, --prompt-ids, or pipe text on stdin")
        a.prompt = sys.stdin.read()
    llm = make_llm(a)
    if a.prompt_ids is not None:
        try:
            ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids: expected comma-separated integers, got {a.prompt_ids!r}") from None
    elif a.raw:
        ids = llm.tokenizer.encode(a.prompt)
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
        ids = llm.tokenizer.encode_chat(messages)
    if a.json:
        out = llm.generate(ids, params, **constraint)
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
                          "prompt_tokens": out.prompt_tokens}, ensure_ascii=False))
        return 0
    start = time.perf_counter()
    for delta in llm.stream(ids, params, **constraint):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    report(llm, a, time.perf_counter() - start)
    return 0


def cmd_chat(a) -> int:
    params = sampling_from_args(a)
    llm = make_llm(a)
    agent = None
    if a.search:
        from .search.cli import make_agent, run_turn

        agent = make_agent(llm, a)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": a.system}] if a.system else []
    history: list[dict] = []
    if interactive:
        print(f"megrez chat ({llm.path}); /reset clears the conversation, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
        else:
            line = sys.stdin.readline()
            if not line:
                return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            if agent is not None:
                agent.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if agent is not None:  # the search loop keeps its own history (calls and observations too)
            try:
                run_turn(agent, line)
            except KeyboardInterrupt:
                print("\n(interrupted)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        reply = []
        start = time.perf_counter()
        try:
            for delta in llm.chat_stream(system + history, params):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        report(llm, a, time.perf_counter() - start)
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(a) -> int:
    import torch

    from .llm import default_model
    from .loading import checkpoint_shards, read_json, resolve_model_path
    from .models import build_model
    from .models.cache import KVCache

    path = resolve_model_path(a.model) if a.model is not None else default_model()
    config = read_json(path / "config.json")
    with torch.device("meta"):
        model = build_model(config, source=str(path / "config.json"))
    args = model.args
    counts = model.parameter_counts()
    print(f"model        {path}")
    print(f"architecture {type(model).__module__.rsplit('.', 1)[-1]} ({', '.join(config.get('architectures') or [])})")
    print(f"hidden {args.hidden_size}, heads {args.num_attention_heads} (KV {args.num_key_value_heads}, "
          f"head_dim {args.head_dim}), vocab {args.vocab_size}, context {args.max_position_embeddings}, "
          f"rope_theta {args.rope_theta:g}")
    print("layers:")
    for line in layer_layout(args):
        print(f"  {line}")
    print(f"parameters   stored {_count(counts['stored'])}, active per token {_count(counts['active'])}")
    for name, size in (("float32", 4), ("bfloat16", 2), ("float16", 2)):
        print(f"weights      {name:9s} {format_bytes(counts['stored'] * size):>10s} stored, "
              f"{format_bytes(counts['active'] * size):>10s} read per token")
    kv = KVCache.bytes_per_token(*model.kv_layout(), torch.bfloat16)
    print(f"KV cache     {format_bytes(kv)} per token in bfloat16 "
          f"({format_bytes(kv * args.max_position_embeddings)} for one full-context sequence)")
    shards = checkpoint_shards(path)
    print(f"files        {len(shards)} safetensors file(s), {format_bytes(sum(s.stat().st_size for s in shards))}")
    return 0


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def layer_layout(args) -> list[str]:
    if not hasattr(args, "owner"):
        return [f"0-{args.num_hidden_layers - 1}: dense SwiGLU (intermediate {args.intermediate_size})"]
    lines, i, n = [], 0, args.num_hidden_layers
    while i < n:
        if not args.is_moe(i):
            lines.append(f"{i}: dense SwiGLU (intermediate {args.intermediate_size})")
            i += 1
            continue
        owner = args.owner(i)
        j = i
        while j + 1 < n and args.is_moe(j + 1) and args.owner(j + 1) == owner:
            j += 1
        shared = f", {args.n_shared_experts} shared ({args.n_shared_experts * args.moe_intermediate_size})" \
            if args.n_shared_experts else ""
        lines.append(f"{i}-{j}: MoE, {args.n_routed_experts} routed experts x {args.moe_intermediate_size} owned by "
                     f"layer {owner}, top-{args.num_experts_per_tok}{shared}, own routers"
                     f"{', pre-gated' if args.pre_gate else ''}")
        i = j + 1
    return lines


def cmd_create_tiny(a) -> int:
    from pathlib import Path

    from .tiny import create_tiny

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        raise ValueError(f"{out} exists and is not empty (use --force to replace it)")
    create_tiny(out, arch=a.arch, seed=a.seed)
    print(f"wrote a tiny random {a.arch} checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megrez", description="Run, serve and train Megrez models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one completion")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (or pipe it on stdin)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text (no template)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--json", action="store_true", help="print one JSON object with token_ids and text")
    p.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="constrain the answer to this JSON schema (inline JSON or a file)")
    p.add_argument("--grammar", default=None, metavar="FILE",
                   help="constrain the answer to a Lark grammar (or GBNF: rules written 'name ::= ...')")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (streams; reads piped stdin line by line)")
    p.add_argument("--system", default=None, help="system message")
    add_model_args(p)
    add_sampling_args(p)
    from .search.cli import add_search_args

    add_search_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="describe a checkpoint without loading its weights")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("create-tiny", help="write a small random checkpoint in the official format")
    p.add_argument("out", help="output directory")
    p.add_argument("--arch", default="moe", choices=["moe", "dense"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_create_tiny)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands that live in their own modules (server, benchmarks, training)."""
    import importlib

    found = []
    for mod in ("megrez.server.cli", "megrez.bench", "megrez.bench_offload", "megrez.train.cli", "megrez.verify",
                "megrez.search.cli"):
        try:
            found.append(importlib.import_module(mod).register)
        except ModuleNotFoundError as e:
            if e.name and not mod.startswith(e.name):
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    from .loading import CheckpointError
    from .models import ConfigError
    from .tokenizer import TokenizerError

    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a) or 0
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"megrez: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
