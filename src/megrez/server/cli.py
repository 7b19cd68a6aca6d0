"""``megrez serve``: the OpenAI-compatible server.

    megrez serve --model DIR_OR_HUB_ID --port 8000 --api-key KEY --served-model-name megrez2

The key can also come from the MEGREZ_API_KEY environment variable (keeps it out of the
process list). FastAPI and uvicorn are imported only when the command runs.
"""
from __future__ import annotations

import argparse
import errno
import os
import socket
import sys

from .protocol import Limits

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
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use; the first is reported (default: the --model argument)")
    g.add_argument("--max-request-bytes", type=parse_size, default=4 << 20,
                   help="largest request body accepted (default 4MiB; larger gets 413)")
    g.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                   help="Megrez-3B-Omni: let image/audio content parts name local files under DIR (repeatable; "
                        "default: only data: URLs and base64 audio; remote URLs are never fetched)")
    g.add_argument("--max-header-bytes", type=parse_size, default=64 << 10,
                   help="largest request head (request line and headers) accepted (default 64KiB; larger gets 431)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request headers (default 10; then 408)")
    g.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send its request body (default 60; then 408)")
    g.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="on SIGTERM/Ctrl-C, seconds open requests get to finish before they are ended (default 5)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    g = p.add_argument_group("per-request limits")
    g.add_argument("--max-request-tokens", type=int, default=Limits.max_request_tokens,
                   help=f"tokens one request may generate over all its choices (default {Limits.max_request_tokens}"
                        f"); an unset max_tokens is lowered to fit, a larger explicit one gets 400")
    g.add_argument("--max-logprobs", type=int, default=Limits.max_logprobs,
                   help=f"most logprobs / top_logprobs a request may ask for (default {Limits.max_logprobs})")
    g.add_argument("--max-response-bytes", type=parse_size, default=Limits.max_response_bytes,
                   help="worst-case size of a whole (non-streamed) answer (default 16MiB); as for "
                        "--max-request-tokens")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=16, help="most sequences decoded together (default 16)")
    g.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="KV cache budget, e.g. 2GiB (default: half the free GPU memory, 4GiB on CPU)")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="bound of the waiting queue; requests beyond it get 429 (default 1024)")
    g.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill forward pass")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt from scratch instead of reusing cached prefix blocks")
    g = p.add_argument_group("web search (the web_search tool; off unless a backend is given)")
    g.add_argument("--search-index", default=None, metavar="PATH",
                   help="serve web_search from this local index (made by `megrez index add`)")
    g.add_argument("--search-backend", default=None, choices=["local", "serper"],
                   help="local (default with --search-index; $MEGREZ_CACHE/search/index.sqlite without it) or "
                        "serper (the web; needs SERPER_API_KEY)")
    g.add_argument("--search-pages", type=int, default=5, help="pages summarised per search (default 5)")
    p.set_defaults(func=cmd_serve)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a port in use is reported at
    once (uvicorn serves on this very socket: nothing can take the port in between)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is already in use (another server?); stop it or pick "
                             f"another --port") from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def build_engine(a):
    """Model, tokenizer and engine from the parsed arguments."""
    from ..cli import announce_template, make_llm

    llm = make_llm(a, max_num_seqs=a.max_num_seqs, kv_cache_memory=a.kv_cache_memory, max_waiting=a.max_waiting,
                   prefill_chunk=a.prefill_chunk, block_size=a.block_size, enable_prefix_caching=a.prefix_caching)
    announce_template(llm)
    return llm.path, llm.engine


def server_config(a, names: list[str], api_key: str | None):
    from dataclasses import replace

    from .app import ServerConfig

    for name in ("max_num_seqs", "max_waiting", "prefill_chunk", "block_size", "max_request_tokens", "max_logprobs"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("header_timeout", "body_timeout", "shutdown_timeout"):
        if not getattr(a, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    limits = replace(Limits(), max_request_tokens=a.max_request_tokens, max_logprobs=a.max_logprobs,
                     max_response_bytes=a.max_response_bytes)
    return ServerConfig(served_model_names=names, api_key=api_key, max_request_bytes=a.max_request_bytes,
                        body_timeout=a.body_timeout, limits=limits,
                        allowed_media_dirs=tuple(a.allowed_local_media_path))


def cmd_serve(a) -> int:
    try:
        from .app import create_app
        from .http import make_server
    except ModuleNotFoundError as e:
        raise ValueError(f"megrez serve needs FastAPI and uvicorn ({e}); install them with "
                         f"scripts/setup.sh serve, or pip install -e '.[serve]' in the megrez checkout") from None
    if not 0 <= a.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    names = a.served_model_name or [a.model if a.model is not None else "megrez"]
    config = server_config(a, names, api_key)  # bad flags fail before the model loads
    if a.search_index is not None or a.search_backend is not None:
        from ..search import open_backend

        if a.search_pages < 1:
            raise ValueError("--search-pages must be at least 1")
        config.search_backend = open_backend(a.search_backend or "local", a.search_index)
        config.search_pages = a.search_pages
    sock = bind(a.host, a.port)
    try:
        path, engine = build_engine(a)
    except BaseException:
        sock.close()
        raise
    a.port = sock.getsockname()[1]  # the port the system chose for --port 0
    if a.served_model_name is None and a.model is None:
        config.served_model_names = names = [path.name]
    app = create_app(engine, config)
    print(f"megrez: serving {path} as {', '.join(names)} on http://{a.host}:{a.port}/v1 "
          f"(up to {engine.max_num_seqs} sequences of up to {engine.max_model_len} tokens; "
          f"{engine.cache.nbytes / 2**20:.0f} MiB KV cache: {engine.blocks.usable * engine.block_size} tokens in "
          f"blocks of {engine.block_size}, prefix caching {'on' if engine.blocks.enable_prefix_caching else 'off'}; "
          f"API key {'required' if api_key else 'not required'})",
          file=sys.stderr, flush=True)
    server = make_server(app, a.host, a.port, log_level=a.log_level, header_timeout=a.header_timeout,
                         max_header_bytes=a.max_header_bytes, shutdown_timeout=a.shutdown_timeout,
                         on_drain=app.state.server.drain)
    server.run(sockets=[sock])
    # uvicorn re-raises the signal that stopped it once it has shut down; where that does not end
    # the process (a handler installed by a library), the status still says which signal it was.
    return 0 if server.exit_signal is None else 128 + server.exit_signal
