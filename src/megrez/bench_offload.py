"""``megrez bench-offload``: decode speed of Megrez2 with routed experts offloaded to host
memory, swept over device memory budgets, against two baselines measured in the same run
and the ceiling the measured copy bandwidth allows.

    megrez bench-offload --shape megrez2-3x7b-a3b --budgets 5GiB 6GiB 8GiB 10GiB 12GiB --batch 1 8

Modes per budget: ``prefetch`` (the engine: pre-gate prefetch + group-aware cache),
``lru`` (prefetch with a plain LRU cache), ``cache-only`` (no prefetch: missing experts
load when the layer needs them), ``naive`` (on-demand synchronous loading, nothing reused
across the sharing group). ``all-on-device`` (no budget) gives the compute time.

Routing: ``uniform`` uses the random router (with random weights it keeps most of a layer's
experts from one token to the next, so it is not the worst case; ``--tier storage`` draws
experts independently); ``trace`` replays a synthetic expert-selection trace with the temporal
locality of a trained MoE (see :func:`make_trace`; its statistics are printed).
"""
from __future__ import annotations

import json
import time

import torch

from .bench import SHAPES, best_time, device_name, random_model, require_memory, shape_bytes, sync
from .engine import Engine, SamplingParams
from .engine.offload import ExpertOffload, format_bytes, parse_bytes
from .loading import resolve_device, resolve_dtype


def make_trace(num_layers: list[int], owner_of: dict[int, int], num_experts: int, top_k: int, steps: int,
               rows: int, keep: float = 0.5, zipf: float = 1.0, group_share: float = 0.7, seed: int = 0):
    """A synthetic expert-selection trace: trace[row][step][layer] = list of top_k experts.

    Built to have what trained MoEs show: skewed expert popularity (Zipf exponent ``zipf``
    over a random ranking per sharing group, each layer following its group's ranking with
    weight ``group_share`` and a ranking of its own otherwise) and temporal locality (each of
    a token's experts is kept for the next token with probability ``keep``; the others are
    drawn from the layer's popularity)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    zipf_p = ranks ** -zipf
    group_perm = {o: torch.randperm(num_experts, generator=g) for o in set(owner_of.values())}
    popularity = {}
    for layer in num_layers:
        own = torch.zeros(num_experts, dtype=torch.float64)
        own[torch.randperm(num_experts, generator=g)] = zipf_p
        shared = torch.zeros(num_experts, dtype=torch.float64)
        shared[group_perm[owner_of[layer]]] = zipf_p
        p = group_share * shared + (1 - group_share) * own
        popularity[layer] = p / p.sum()
    trace = []
    for _ in range(rows):
        prev = {layer: torch.multinomial(popularity[layer], top_k, generator=g).tolist() for layer in num_layers}
        row = []
        for _ in range(steps):
            step = {}
            for layer in num_layers:
                kept = [e for e in prev[layer] if torch.rand((), generator=g).item() < keep]
                p = popularity[layer].clone()
                p[kept] = 0
                fresh = torch.multinomial(p, top_k - len(kept), generator=g).tolist() if len(kept) < top_k else []
                step[layer] = kept + fresh
            row.append(step)
            prev = step
        trace.append(row)
    return trace


def trace_statistics(trace, top_k: int, num_experts: int) -> dict:
    reuse, counts = [], {}
    for row in trace:
        for a, b in zip(row, row[1:]):
            for layer in a:
                reuse.append(len(set(a[layer]) & set(b[layer])) / top_k)
        for step in row:
            for layer, experts in step.items():
                for e in experts:
                    counts[(layer, e)] = counts.get((layer, e), 0) + 1
    per_layer: dict = {}
    for (layer, e), c in counts.items():
        per_layer.setdefault(layer, []).append(c)
    quarter = num_experts // 4
    share = [sum(sorted(v, reverse=True)[:quarter]) / sum(v) for v in per_layer.values()]
    return {"next_token_reuse": sum(reuse) / max(len(reuse), 1), "top_quarter_share": sum(share) / len(share)}


class TraceReplay:
    """A routing override that substitutes the trace's experts (the router's weights stay)."""

    def __init__(self, trace):
        self.trace, self.step = trace, 0

    def __call__(self, layer, weights, indices):
        picked = [self.trace[r % len(self.trace)][self.step % len(self.trace[0])][layer]
                  for r in range(indices.shape[0])]
        return weights, torch.tensor(picked, dtype=indices.dtype, device=indices.device)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Host -> device copy rate from pinned memory (host memcpy rate on a CPU-only machine)."""
    pinned = device.type == "cuda"
    src = torch.ones(nbytes // 4, dtype=torch.float32, pin_memory=pinned)
    dst = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / best_time(lambda: dst.copy_(src, non_blocking=pinned), device)


def start_random_decode(model, batch: int, prompt: int, output: int, replay, kv_bytes: int, seed: int = 0):
    """An engine with ``batch`` greedy requests of random ``prompt``-token prompts, prefilled
    (the trace replay, if any, restarted first): (engine, requests)."""
    engine = Engine(model, None, max_num_seqs=batch, max_model_len=prompt + output + 1, kv_cache_memory=kv_bytes)
    gen = torch.Generator().manual_seed(seed)
    reqs = [engine.add_request(torch.randint(0, model.args.vocab_size, (prompt,), generator=gen).tolist(),
                               SamplingParams(temperature=0, max_tokens=output, ignore_eos=True))
            for _ in range(batch)]
    if replay is not None:
        replay.step = 0
    engine.step()  # prefill
    return engine, reqs


def decode_run(model, batch: int, prompt: int, output: int, replay: TraceReplay | None, seed: int = 0):
    """Greedy decode of ``batch`` random prompts; returns (seconds per step, tokens of row 0, steps)."""
    device = next(model.parameters()).device
    engine, reqs = start_random_decode(model, batch, prompt, output, replay, 1 << 40, seed)
    times = []
    while engine.running:
        if replay is not None:
            replay.step += 1
        sync(device)
        t = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - t)
    warm = times[2:] or times
    return sum(warm) / len(warm), reqs[0].output_ids, len(times)


def device_banks(model, device):
    """Copies of the host expert banks on the device (for the all-on-device baseline)."""
    args = model.args
    owners = sorted({args.owner(i) for i in range(args.num_hidden_layers) if args.is_moe(i)})
    host = {o: model.layers[o].mlp.experts for o in owners}
    on_device = {o: _copy_bank(b, device) for o, b in host.items()}
    return host, on_device


def _copy_bank(bank, device):
    import copy

    new = copy.copy(bank)
    new._parameters = {k: torch.nn.Parameter(v.detach().to(device), requires_grad=False)
                       for k, v in bank._parameters.items()}
    return new


def set_banks(model, banks):
    for o, b in banks.items():
        model.layers[o].mlp.experts = b


def bench(a) -> dict:
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, {"torch_dtype": "bfloat16"}, device)
    sizes = shape_bytes(a.shape, dtype, a.kv_heads)
    # Experts live in host memory; the all-on-device reference puts a second copy on the device.
    reference = sizes["experts"] if a.reference else 0
    if device.type == "cpu":
        require_memory(a.shape, dtype, device, sizes["rest"] + sizes["experts"] + reference,
                       "the weights, and the experts twice for the all-on-device reference" if a.reference
                       else "the weights")
    else:
        require_memory(a.shape, dtype, torch.device("cpu"), sizes["experts"], "the routed experts in host memory")
        require_memory(a.shape, dtype, device, sizes["rest"] + reference,
                       "the non-expert weights and the all-on-device reference's experts" if a.reference
                       else "the non-expert weights")
    model = random_model(a.shape, device, dtype, a.kv_heads, expert_device=torch.device("cpu"))
    args = model.args
    moe_layers = [i for i in range(args.num_hidden_layers) if args.is_moe(i)]
    expert_bytes = 3 * args.hidden_size * args.moe_intermediate_size * torch.empty((), dtype=dtype).element_size()
    resident = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    copy_bw = measure_copy_bandwidth(device)
    steps = a.output + 1
    trace = make_trace(moe_layers, {i: args.owner(i) for i in moe_layers}, args.n_routed_experts,
                       args.num_experts_per_tok, steps + 2, rows=max(a.batch), seed=a.seed)
    tstats = trace_statistics(trace, args.num_experts_per_tok, args.n_routed_experts)
    print(f"{a.shape} on {device_name(device)} ({dtype}): non-expert weights {format_bytes(resident)}, "
          f"one expert {format_bytes(expert_bytes)}, measured host->device copy {copy_bw / 1e9:.1f} GB/s")
    print(f"trace: next-token expert reuse {tstats['next_token_reuse']:.0%}, top quarter of experts carry "
          f"{tstats['top_quarter_share']:.0%} of selections")
    replays = {routing: TraceReplay(trace) if routing == "trace" else None for routing in a.routing}
    rows, reference = [], {}
    if a.reference:
        # All reference runs first: the device copies of the experts must be gone before any
        # offloaded run, whose peak memory has to stay within its budget.
        host, on_device = device_banks(model, device)
        set_banks(model, on_device)
        for routing, replay in replays.items():
            model.routing_override = replay
            for batch in a.batch:
                compute_s, tokens, _ = decode_run(model, batch, a.prompt, a.output, replay, a.seed)
                reference[routing, batch] = compute_s, tokens
                rows.append({"routing": routing, "batch": batch, "budget": "all-on-device", "mode": "all-on-device",
                             "tokens_per_s": batch / compute_s, "step_ms": compute_s * 1e3})
        set_banks(model, host)
        del on_device
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for routing, replay in replays.items():
        model.routing_override = replay
        for batch in a.batch:
            compute_s, ref_tokens = reference.get((routing, batch), (None, None))
            for budget_text in a.budgets:
                budget = parse_bytes(budget_text)
                kv = a.kv_cache_memory
                cache_bytes = budget - resident - kv - (256 << 20 if device.type == "cuda" else 0)
                for mode in a.modes:
                    policy = "lru" if mode == "lru" else "group"
                    offload = ExpertOffload(model, device, cache_bytes, policy=policy,
                                            prefetch=mode in ("prefetch", "lru"), reuse=mode != "naive")
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    step_s, tokens, n_steps = decode_run(model, batch, a.prompt, a.output, replay, a.seed)
                    s = offload.stats
                    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
                    offload.detach()
                    del offload
                    missed = (s["prefetched"] + s["misses"]) * expert_bytes / max(n_steps + 1, 1)
                    floor = max(compute_s or 0.0, missed / copy_bw)
                    row = {"routing": routing, "batch": batch, "budget": budget_text, "mode": mode,
                           "tokens_per_s": batch / step_s, "step_ms": step_s * 1e3, "hit_rate": s["hit_rate"],
                           "exposed_copy_s": s["copy_seconds_exposed"], "copied_gib": s["bytes_copied"] / 2 ** 30,
                           "ceiling_tokens_per_s": batch / floor if floor else None, "peak_gib": peak,
                           "within_budget": peak <= budget / 2 ** 30 if peak is not None else None,
                           "identical_to_all_on_device": (tokens == ref_tokens) if ref_tokens is not None else None}
                    if row["ceiling_tokens_per_s"]:
                        row["of_ceiling"] = row["tokens_per_s"] / row["ceiling_tokens_per_s"]
                    rows.append(row)
    model.routing_override = None
    print("routing | batch | budget | mode | tok/s | step ms | hit rate | exposed copy s | ceiling tok/s | "
          "of ceiling | peak GiB | same tokens")
    for r in rows:
        print(" | ".join(str(_fmt(r.get(k))) for k in ("routing", "batch", "budget", "mode", "tokens_per_s", "step_ms",
                                                        "hit_rate", "exposed_copy_s", "ceiling_tokens_per_s",
                                                        "of_ceiling", "peak_gib", "identical_to_all_on_device")))
    summary = {"shape": a.shape, "device": device_name(device), "dtype": str(dtype), "copy_bandwidth": copy_bw,
               "expert_bytes": expert_bytes, "resident_bytes": resident, "trace": tstats,
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps(summary))
    return summary


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else v


def budget_text(text: str) -> str:
    """argparse type for --budgets: a size; with --tier storage also ``min`` or ``N%``."""
    from .cli import size_text

    if text == "min" or (text.endswith("%") and text[:-1].replace(".", "", 1).isdigit()):
        return text
    return size_text(text)


HOST_MODES = ["prefetch", "lru", "cache-only", "naive"]


def run(a) -> dict:
    if a.tier == "storage":
        from .bench_storage import MODES, bench_storage

        a.modes = a.modes or list(MODES)
        a.budgets = a.budgets or ["min", "12.5%", "25%", "50%", "100%"]
        a.routing = a.routing or ["uniform", "trained"]
        a.batch = a.batch or [1, 4]
        a.output = a.output or 24
        a.kv_cache_memory = a.kv_cache_memory or 16 << 20
        bad = [m for m in a.modes if m not in MODES] + [r for r in a.routing if r not in ("uniform", "trained")]
        if bad:
            raise ValueError(f"--tier storage: {', '.join(bad)} not available (modes: {', '.join(MODES)}; "
                             f"routing: uniform, trained)")
        return bench_storage(a)
    a.modes = a.modes or HOST_MODES
    a.budgets = a.budgets or ["5GiB", "6GiB", "8GiB", "10GiB", "12GiB"]
    a.routing = a.routing or ["uniform", "trace"]
    a.batch = a.batch or [1, 8]
    a.output = a.output or 64
    a.kv_cache_memory = a.kv_cache_memory or 256 << 20
    bad = [m for m in a.modes if m not in HOST_MODES] + [r for r in a.routing if r not in ("uniform", "trace")]
    bad += [b for b in a.budgets if b == "min" or b.endswith("%")]
    if bad:
        raise ValueError(f"--tier host: {', '.join(bad)} not available (modes: {', '.join(HOST_MODES)}; routing: "
                         f"uniform, trace; budgets: sizes)")
    return bench(a)


def register(sub) -> None:
    from .bench_storage import add_storage_args
    from .cli import device_arg, size_arg

    p = sub.add_parser("bench-offload", help="decode speed with experts offloaded, swept over memory budgets",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--tier", default="host", choices=["host", "storage"],
                   help="host: experts in host memory, cached on the device (--gpu-memory-budget); storage: experts "
                        "in the checkpoint file, cached in RAM (--memory-budget; see megrez.bench_storage)")
    p.add_argument("--shape", default="megrez2-350m", choices=sorted(k for k in SHAPES if k.startswith("megrez2")),
                   help="named Megrez2 shape with random weights (megrez.presets)")
    p.add_argument("--kv-heads", type=int, default=None, help="override the shape's KV head count")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (auto: float32 on CPU, bfloat16 on GPU; --tier storage: bfloat16)")
    p.add_argument("--budgets", nargs="+", default=None, type=budget_text, metavar="SIZE",
                   help="memory budgets to sweep (e.g. 6GiB, 512MiB; --tier storage also min and N%% of the routed "
                        "experts; default host: 5GiB 6GiB 8GiB 10GiB 12GiB, storage: min 12.5%% 25%% 50%% 100%%)")
    p.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                   help="host: prefetch (the engine), lru (prefetch with plain LRU), cache-only (no prefetch), naive "
                        "(on-demand loads, no reuse); storage: prefetch, lru, sync (no prefetch), mmap (memory-mapped "
                        "file, page faults). Default: all of the tier's")
    p.add_argument("--routing", nargs="+", default=None, metavar="ROUTING",
                   help="uniform: the random router; host: trace (a synthetic trace with a trained MoE's locality); "
                        "storage: trained (the bundled trained model's recorded routing). Default: both")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default host: 1 8, storage: 1 4)")
    p.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--output", type=int, default=None,
                   help="tokens to decode per sequence (default host: 64, storage: 24)")
    p.add_argument("--kv-cache-memory", type=size_arg, default=None, metavar="SIZE",
                   help="KV cache inside each budget, e.g. 512KiB or 256MiB (default host: 256MiB, storage: 16MiB)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="host: skip the all-on-device run (it needs the whole model on the device)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and requests")
    add_storage_args(p)
    p.set_defaults(func=lambda a: run(a) and 0)
