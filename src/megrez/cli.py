"""The ``megrez`` command line.

    megrez generate "你好" --model DIR_OR_HUB_ID       one completion (chat template applied)
    megrez chat --model DIR_OR_HUB_ID                 interactive, streaming; /help lists its commands
    megrez info DIR_OR_HUB_ID                         layer layout, parameters, memory
    megrez create-tiny OUT --arch moe|dense|omni      a small random checkpoint

Without ``--model``, the default model is used (see ``megrez.llm.default_model``).

``add_model_args``/``make_llm`` are the one place for model flags, ``add_sampling_args`` for
sampling flags; subcommands in other modules register through ``_extra_commands``. Every
parser is a :class:`Parser`: no abbreviated options (a new flag never breaks an old command
line), and a misspelt option or command gets a suggestion.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import time

from .engine.offload import format_bytes, parse_bytes
from .engine.sampling import SamplingParams


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default unless its help already speaks of one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default in (None, False, argparse.SUPPRESS) or default == []
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".strip().replace("%", "%%")


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations, whose errors name the subcommand at fault and suggest
    the closest option or choice."""

    _deepest: "Parser | None" = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        Parser._deepest = self  # subcommand parsers run inside their parent's call: the last is the leaf
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        Parser._deepest = None
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            leaf = Parser._deepest or self
            leaf.error(leaf.unrecognized(extras))
        return ns

    def unrecognized(self, extras: list[str]) -> str:
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        flags = [a for a in extras if a.startswith("-")]
        notes = []
        for arg in flags or extras:  # values after an unknown option are not worth naming
            if arg.startswith("-"):
                close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1, cutoff=0.6)
                notes.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
            else:
                notes.append(repr(arg))
        extras = flags or extras
        return f"unrecognized argument{'s' if len(extras) > 1 else ''}: {', '.join(notes)}"

    def error(self, message: str):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def device_arg(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda, cuda:N (mps where torch has it)."""
    if not DEVICE.match(text):
        hint = " (did you mean cuda?)" if text.lower().startswith(("gpu", "nvidia")) else ""
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: choose auto, cpu, cuda or cuda:N{hint}")
    return text


def size_arg(text: str) -> int:
    """argparse type for memory sizes: 512KiB, 6GiB, 1.5G, 2GB or bytes (binary units)."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size_text(text: str) -> str:
    """Like size_arg, but keeps the text as written (for labels in reports)."""
    size_arg(text)
    return text


def add_model_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    g = p.add_argument_group("model")
    if model_optional:
        g.add_argument("--model", "-m", default=None,
                       help="checkpoint directory or Hugging Face hub id (default: the bundled/tiny model)")
    g.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: float32 on CPU, the checkpoint's dtype on GPU)")
    g.add_argument("--router-bias", default=None, choices=["own", "owner", "none"],
                   help="Megrez2: whose e_score_correction_bias each layer selects experts with "
                        "(own = llama.cpp; owner = SGLang demo; none = vLLM with the official patch)")
    g.add_argument("--quantization", "-q", default=None, choices=["q8_0", "q4_0", "q4_k_m"],
                   help="quantize the weights while loading (llama.cpp's block formats and mixes; q4_k_m: Q4_K with "
                        "Q6_K for the sensitive tensors). A GGUF file's own types are used as they are")
    g.add_argument("--max-model-len", type=int, default=None, help="context length to allocate (default: model's)")
    g.add_argument("--gpu-memory-budget", default=None, metavar="SIZE", type=size_arg,
                   help="Megrez2: device memory to use (e.g. 6GiB); routed experts stay in host memory and "
                        "are cached on the device, prefetched from the pre-gate")
    g.add_argument("--memory-budget", default=None, metavar="SIZE", type=size_arg,
                   help="Megrez2 on a CPU: host memory to use (e.g. 3GiB); routed experts stay in the checkpoint "
                        "files and are read (direct I/O) into a RAM expert cache, prefetched from the pre-gate")
    g.add_argument("--offload-policy", default="group", choices=["group", "lru"],
                   help="expert cache eviction policy with --gpu-memory-budget or --memory-budget (default: group)")
    g.add_argument("--no-prefetch", action="store_true",
                   help="with --gpu-memory-budget or --memory-budget: load experts only when a layer needs them")
    g.add_argument("--io-threads", type=int, default=4, metavar="N",
                   help="with --memory-budget: threads reading experts from storage (reads in flight at once)")
    g.add_argument("--verbose", "-v", action="store_true", help="print speed and expert-cache statistics to stderr")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for tensor ops (default: one per core). On a machine shared with other busy "
                        "processes, set it to the free cores: oversubscribed threads slow decoding several times")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: the checkpoint's generation_config.json, else the default shown)")
    g.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=None, metavar="N",
                   help="most tokens to generate (default: none: until a stop token or string, or a full context)")
    g.add_argument("--temperature", "-t", type=float, default=None, metavar="T",
                   help="0 means greedy (default: 1.0)")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass (default: 1.0, off)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest (default: 0, off)")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="divide the logits of tokens already seen (default: 1.0, off)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable; default: none)")


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
    return LLM(a.model, device=a.device, dtype=a.dtype, router_bias=a.router_bias, quantization=a.quantization,
               max_model_len=a.max_model_len,
               max_num_seqs=max_num_seqs, kv_cache_memory=kv_cache_memory, gpu_memory_budget=a.gpu_memory_budget,
               memory_budget=a.memory_budget, offload_policy=a.offload_policy, prefetch=not a.no_prefetch,
               io_threads=a.io_threads, **engine_options)


def announce_template(llm) -> None:
    """Say so when the checkpoint has no chat template of its own and the built-in one is used."""
    if llm.tokenizer.chat_template_source != "tokenizer_config.json":
        print(f"megrez: {llm.path} has no chat_template (tokenizer_config.json or chat_template.jinja); "
              f"using the built-in Megrez chat format", file=sys.stderr)


def cut_notice(completion_tokens: int, finish_reason: str | None, params, max_model_len: int) -> str | None:
    """Why an answer ended early, for the user (None when it ended by itself)."""
    if finish_reason != "length":
        return None
    if params.max_tokens is not None and completion_tokens >= params.max_tokens:
        return f"answer cut at max_tokens={params.max_tokens} (--max-tokens N for longer answers)"
    return f"answer cut: the {max_model_len}-token context is full"


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
        print(offload_summary(llm.offload.stats), file=sys.stderr)


def offload_summary(s: dict) -> str:
    """One line of expert-cache statistics (--verbose)."""
    types = f", {'/'.join(s['expert_types'])} experts" if "expert_types" in s else ""
    line = (f"[expert cache ({s['tier']}, {s['policy']}{types}): {s['slots']} slots ({format_bytes(s['cache_bytes'])}), "
            f"hit rate {s['hit_rate']:.1%}, prefetched {s['prefetched']}, on demand {s['misses']}")
    if s["tier"] == "storage-to-ram":
        stalls = s["per_layer_stall_seconds"]
        worst = max(stalls, key=stalls.get) if stalls else None
        line += (f"; read {format_bytes(s['bytes_read'])} in {s['reads']} reads ({s['io']}, "
                 f"{s['read_bandwidth'] / 1e9:.2f} GB/s), I/O time {s['copy_seconds']:.3f}s: hidden "
                 f"{s['copy_seconds_hidden']:.3f}s, exposed {s['copy_seconds_exposed']:.3f}s"
                 + (f" (most in layer {worst}: {stalls[worst]:.3f}s)" if worst is not None else "") + "]")
    else:
        line += (f", copied {format_bytes(s['bytes_copied'])}, copy time {s['copy_seconds']:.3f}s of which exposed "
                 f"{s['copy_seconds_exposed']:.3f}s]")
    return line


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
        announce_template(llm)
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
        ids = llm.tokenizer.encode_chat(messages)
    if a.json:
        out = llm.generate(ids, params, **constraint)
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
                          "prompt_tokens": out.prompt_tokens}, ensure_ascii=False))
        return 0
    start = time.perf_counter()
    last = None
    processors = llm.constraint_processors(**constraint) if constraint else None
    for last in llm.stream_outputs(ids, params, processors=processors):
        if last.new_text:
            sys.stdout.write(last.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    note = cut_notice(last.completion_tokens, last.finish_reason, llm.last_request.params, llm.engine.max_model_len)
    if note:
        print(f"megrez: {note}", file=sys.stderr)
    report(llm, a, time.perf_counter() - start)
    return 0


def cmd_chat(a) -> int:
    from .chat import ChatSession, repl
    from .multimodal.chat import default_omni_model, media_parts
    from .multimodal.prompt import is_multimodal_model

    params = sampling_from_args(a)
    media = media_parts(a.image, a.audio)  # also registers /image and /audio
    if a.model is None and media:
        a.model = default_omni_model()
    llm = make_llm(a)
    if media and not is_multimodal_model(llm.model):
        raise ValueError(f"--image/--audio need a Megrez-3B-Omni checkpoint; {llm.path} takes text only")
    announce_template(llm)
    if a.search:  # the search loop keeps its own history (calls and observations too)
        from .search.cli import search_session

        session = search_session(llm, a, params, system=a.system,
                                 after_answer=lambda seconds: report(llm, a, seconds))
    else:
        session = ChatSession(llm, params, system=a.system, after_answer=lambda seconds: report(llm, a, seconds))
    session.pending_parts = media
    if a.load:
        session.load(a.load)
    return repl(session)


def cmd_info(a) -> int:
    import torch

    from .llm import default_model
    from .loading import checkpoint_shards, read_json, resolve_model_path
    from .loading.gguf import GGUFCheckpoint, is_gguf
    from .models import build_model
    from .models.cache import KVCache

    path = resolve_model_path(a.model) if a.model is not None else default_model()
    gguf_file = GGUFCheckpoint(path) if is_gguf(path) else None
    config = gguf_file.config if gguf_file is not None else read_json(path / "config.json")
    with torch.device("meta"):
        model = build_model(config, source=str(path / "config.json"))
    args = model.args
    counts = model.parameter_counts()
    print(f"model        {path}")
    kind = getattr(type(model), "hf_architecture", (None, type(model).__module__.rsplit(".", 1)[-1]))[1]
    print(f"architecture {kind} ({', '.join(config.get('architectures') or [])})")
    if "vision" in counts:  # Megrez-3B-Omni: the encoders beside the language model
        print(f"encoders     vision {_count(counts['vision'])}, audio {_count(counts['audio'])} parameters")
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
    from .quant.recipe import QUANTIZED_SCHEMES, scheme_bytes

    for scheme in QUANTIZED_SCHEMES:
        stored, active = scheme_bytes(model, scheme)
        print(f"weights      {scheme:9s} {format_bytes(stored):>10s} stored, {format_bytes(active):>10s} read per token"
              f"{'  (--quantization ' + scheme + ')'}")
    kv = KVCache.bytes_per_token(*model.kv_layout(), torch.bfloat16)
    print(f"KV cache     {format_bytes(kv)} per token in bfloat16 "
          f"({format_bytes(kv * args.max_position_embeddings)} for one full-context sequence)")
    if gguf_file is not None:
        from collections import Counter

        types = Counter(qtype.name for _, qtype, _ in gguf_file.tensors.values())
        print(f"file         GGUF ({gguf_file.arch}), {format_bytes(path.stat().st_size)}; tensor types "
              + ", ".join(f"{n} x{c}" for n, c in types.most_common()))
        return 0
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
    from . import __version__
    from .chat import INPUT_HELP, commands_help
    from .multimodal import chat as _media_commands  # noqa: F401  (registers /image and /audio)

    parser = Parser(prog="megrez", description="Run, serve and train Megrez models.")
    parser.add_argument("--version", action="version", version=f"megrez {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate one completion (chat template applied unless --raw)",
                       description="Generate one answer and stream it to stdout.")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (or pipe it on stdin)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text (no template)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--json", action="store_true", help="print one JSON object with token_ids, text and finish_reason")
    p.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="constrain the answer to this JSON schema (inline JSON or a file)")
    p.add_argument("--grammar", default=None, metavar="FILE",
                   help="constrain the answer to a Lark grammar (or GBNF: rules written 'name ::= ...')")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (streams; reads piped stdin one message per line)",
                       description="Chat with a model in the terminal. The conversation outlives the context: "
                                   "the oldest turns are left out when it no longer fits (the system prompt stays).",
                       epilog=f"In the chat:\n{commands_help()}\n\n{INPUT_HELP}",
                       formatter_class=type("ChatHelp", (HelpFormatter, argparse.RawDescriptionHelpFormatter), {}))
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--load", default=None, metavar="FILE", help="start from a conversation saved with /save")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach an image to the first message (repeatable; Megrez-3B-Omni models; "
                        "without --model: the bundled omni model, where the package ships one); /image PATH in the chat")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="attach an audio file (wav, flac, mp3, m4a, ...) to the first message (repeatable); "
                        "/audio PATH in the chat")
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
    p.add_argument("--arch", default="moe", choices=["moe", "dense", "omni"],
                   help="moe: a Megrez2 (MegrezMoeForCausalLM, shared experts, pre-gated); dense: a Llama like "
                        "Megrez-3B-Instruct; omni: a MegrezO (Megrez-3B-Omni: Llama + SigLIP navit + Whisper encoder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
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
                "megrez.eval.cli", "megrez.quant.cli", "megrez.search.cli"):
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
        print("megrez: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
