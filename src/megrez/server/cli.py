"""``megrez serve``: the OpenAI-compatible server.

    megrez serve --model DIR_OR_HUB_ID --port 8000 --api-key KEY --served-model-name megrez2

The key can also come from the MEGREZ_API_KEY environment variable (keeps it out of the
process list). FastAPI and uvicorn are imported only when the command runs.
"""
from __future__ import annotations

import argparse
import os
import sys

API_KEY_ENV = "MEGREZ_API_KEY"


def parse_size(text: str) -> int:
    """argparse type for sizes: '4MiB', '512M', '2GB', '1048576' (binary units)."""
    from ..engine.offload import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub) -> None:
    from ..cli import add_model_args

    p = sub.add_parser("serve", help="serve the OpenAI API (/v1/chat/completions, /v1/completions)",
                       description="Serve a model over the OpenAI API with continuous batching.")
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use; the first is reported (default: the --model argument)")
    g.add_argument("--max-request-bytes", type=parse_size, default=4 << 20,
                   help="largest request body accepted (default 4MiB; larger gets 413)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (KV cache slots)")
    g.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="KV cache budget, e.g. 2GiB (default: half the free GPU memory, 4GiB on CPU)")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="bound of the waiting queue; requests beyond it get 429 (default 1024)")
    g.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill forward pass")
    g = p.add_argument_group("web search (the web_search tool; off unless a backend is given)")
    g.add_argument("--search-index", default=None, metavar="PATH",
                   help="serve web_search from this local index (made by `megrez index add`)")
    g.add_argument("--search-backend", default=None, choices=["local", "serper"],
                   help="local (default with --search-index; $MEGREZ_CACHE/search/index.sqlite without it) or "
                        "serper (the web; needs SERPER_API_KEY)")
    g.add_argument("--search-pages", type=int, default=5, help="pages summarised per search (default 5)")
    p.set_defaults(func=cmd_serve)


def build_engine(a):
    """Model, tokenizer and engine from the parsed arguments."""
    from ..cli import make_llm

    for name in ("max_num_seqs", "max_waiting", "prefill_chunk"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    llm = make_llm(a, max_num_seqs=a.max_num_seqs, kv_cache_memory=a.kv_cache_memory, max_waiting=a.max_waiting,
                   prefill_chunk=a.prefill_chunk)
    return llm.path, llm.engine


def cmd_serve(a) -> int:
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ModuleNotFoundError as e:
        raise ValueError(f"megrez serve needs FastAPI and uvicorn ({e}); "
                         f"install them with: pip install 'megrez[serve]'") from None
    if not 0 <= a.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    search = None
    if a.search_index is not None or a.search_backend is not None:
        from ..search import open_backend

        search = open_backend(a.search_backend or "local", a.search_index)
    path, engine = build_engine(a)
    names = a.served_model_name or [a.model if a.model is not None else path.name]
    app = create_app(engine, ServerConfig(served_model_names=names, api_key=api_key,
                                          max_request_bytes=a.max_request_bytes, search_backend=search,
                                          search_pages=a.search_pages))
    print(f"megrez: serving {path} as {', '.join(names)} on http://{a.host}:{a.port}/v1 "
          f"({engine.max_num_seqs} sequences x {engine.max_model_len} tokens, "
          f"{engine.cache.nbytes / 2**20:.0f} MiB KV cache; API key {'required' if api_key else 'not required'})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5,
                            server_header=False)
    uvicorn.Server(config).run()
    return 0
