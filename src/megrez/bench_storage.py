"""``megrez bench-offload --tier storage``: decode speed of Megrez2 under a host-memory budget,
routed experts read from the checkpoint file (``--memory-budget``), swept over budgets, with
the baselines measured in the same run and the ceiling the measured storage bandwidth allows.

    megrez bench-offload --tier storage --shape megrez2-350m --batch 1 4 --output 24

A random-weight checkpoint of the shape is written first (``--checkpoint DIR`` keeps it for
the next run). Modes per budget:

* ``prefetch``: the engine (pre-gate prefetch on I/O threads, group-aware cache);
* ``lru``: the same with plain LRU eviction;
* ``sync``: no prefetch -- a layer reads its missing experts when it needs them;
* ``mmap``: the file memory-mapped, experts faulted in on demand by the kernel (what llama.cpp
  does with a model larger than RAM); pages of the least recently used experts are dropped
  (``MADV_DONTNEED`` + ``POSIX_FADV_DONTNEED``) whenever the experts mapped in exceed what the
  budget leaves for experts, as the kernel's reclaim would under a memory cgroup limit.

``all-in-RAM`` (every expert loaded) gives the compute time and the tokens every mode must
reproduce. Routing: ``uniform`` (experts drawn uniformly and independently for every token:
the worst case for a cache, see :func:`uniform_trace`) and ``trained`` (the experts the bundled
trained Megrez2 chose while generating, mapped onto the shape: see :func:`trained_trace`).

Ceiling of each row: batch / max(compute step time, bytes the mode read from storage per step /
measured read bandwidth), the read bandwidth being the larger of an O_DIRECT sequential read of
the same file and expert-sized O_DIRECT reads on the I/O threads, both measured in the run.
"""
from __future__ import annotations

import gc
import json
import mmap
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .engine import SamplingParams
from .engine.offload import ExpertOffload, format_bytes, parse_bytes
from .engine.storage import ExpertStore
from .llm import activation_bytes
from .loading import checkpoint_shards, load_model, save_model
from .models.moe import ExpertBank

MODES = ("prefetch", "lru", "sync", "mmap")
PROMPT = 32


# ------------------------------------------------------------------------------ process memory and I/O

def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def storage_read_bytes() -> int:
    """Bytes this process made the kernel fetch from storage (/proc/self/io ``read_bytes``)."""
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def drop_cached(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ bandwidth

def sequential_bandwidth(path: Path, block: int = 4 << 20, limit: int = 2 << 30) -> float:
    """O_DIRECT sequential read of ``path`` (up to ``limit`` bytes), one thread, bytes/s."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, block)
    try:
        t, off = time.perf_counter(), 0
        while off < limit:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
        return off / (time.perf_counter() - t)
    finally:
        os.close(fd)
        buf.close()


def expert_read_bandwidth(store: ExpertStore, threads: int, count: int = 256, seed: int = 0) -> float:
    """Expert-sized O_DIRECT reads of randomly chosen experts on ``threads`` threads, bytes/s:
    the access pattern of the storage tier."""
    g = torch.Generator().manual_seed(seed)
    keys = list(store.runs)
    picks = [keys[i] for i in torch.randint(0, len(keys), (count,), generator=g).tolist()]
    local = threading.local()

    def read(key):
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, store.span)
        view, pos, total = memoryview(buf), 0, 0
        for run in store.runs[key]:
            total += store.files[run.file].read(view[pos:pos + run.length], run.start, "bench read")
            pos += run.length
        return total

    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        total = sum(pool.map(read, picks))
        return total / (time.perf_counter() - t)


# ------------------------------------------------------------------------------ the mmap baseline

class MmapExperts:
    """Routed experts as views into the memory-mapped checkpoint (faulted in by the kernel),
    with the least recently used experts' pages dropped beyond ``limit`` experts."""

    def __init__(self, model, store: ExpertStore, limit: int):
        self.model, self.store, self.limit = model, store, max(limit, 1)
        self.maps = []
        self.raw = []
        for path in store.paths:
            fd = os.open(path, os.O_RDONLY)
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # private: torch needs a writable buffer
            self.maps.append((fd, m))
            self.raw.append(torch.frombuffer(m, dtype=torch.uint8))
        self.views, self.ranges = {}, {}
        for key, runs in store.runs.items():
            parts = {}
            for run in runs:
                for p in run.pieces:
                    parts[p.proj] = self.raw[run.file][p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape)
            self.views[key] = (parts["gate_proj"], parts["up_proj"], parts["down_proj"])
            self.ranges[key] = [(run.file, run.start, run.length) for run in runs]
        self.resident: OrderedDict = OrderedDict()
        args = model.args
        owners = sorted({args.owner(i) for i in range(args.num_hidden_layers) if args.is_moe(i)})
        self.saved = {o: model.layers[o].mlp.experts for o in owners}
        for o in owners:
            model.layers[o].mlp.experts = MmapBank(self.saved[o], o, self)

    def use(self, keys: list) -> None:
        for key in keys:
            self.resident.pop(key, None)
            self.resident[key] = None
        wanted = set(keys)
        while len(self.resident) > self.limit:
            victim = next((k for k in self.resident if k not in wanted), None)
            if victim is None:  # one layer needs more than the limit (prefill): over it until the next layer
                break
            del self.resident[victim]
            for file, start, length in self.ranges[victim]:
                fd, m = self.maps[file]
                length = min(length, len(m) - start)
                m.madvise(mmap.MADV_DONTNEED, start, length)
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)

    def detach(self) -> None:
        for o, bank in self.saved.items():
            self.model.layers[o].mlp.experts = bank
        self.views, self.raw = {}, []
        gc.collect()
        for fd, m in self.maps:
            try:
                m.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with it
                pass
            os.close(fd)


class MmapBank(ExpertBank):
    weights_stay_valid = True

    def __init__(self, meta: ExpertBank, owner: int, experts: MmapExperts):
        torch.nn.Module.__init__(self)
        self.num_experts, self.owner = meta.num_experts, owner
        self._experts = [experts]

    def expert_weights(self, experts: list[int]):
        src = self._experts[0]
        keys = [(self.owner, e) for e in experts]
        src.use(keys)
        for key in keys:
            yield key[1], src.views[key]


# ------------------------------------------------------------------------------ routing

def record_trained_routing(sequences: int, steps: int, seed: int = 0) -> tuple[list, dict]:
    """The experts the bundled trained Megrez2 picks while it answers chat prompts (sampled at
    temperature 0.8, one sequence at a time): routing[seq][step][layer] = [(expert, weight)]."""
    from .llm import LLM, default_model

    llm = LLM(default_model(), device="cpu")
    prompts = ["Hello!", "Who are you?", "你好", "What is 7 + 5?", "Recite a poem about the moon.",
               "Continue: In the beginning God created", "床前明月光，", "Tell me about the sea.",
               "How are you today?", "What is the capital of France?", "写一首关于春天的诗。", "Count from 1 to 10.",
               "Give me a proverb.", "What is 12 * 3?", "Say something kind.", "白日依山尽，"]
    routing, current = [], {}

    def hook(layer, indices, weights):
        if indices.shape[0] == 1:  # a decode step (prefill routes many tokens at once)
            current[layer] = list(zip(indices[0].tolist(), weights[0].tolist()))

    llm.model.routing_hooks.append(hook)
    for s in range(sequences):
        msg = [{"role": "user", "content": prompts[s % len(prompts)]}]
        seq = []
        params = SamplingParams(temperature=0.8, max_tokens=steps + 1, ignore_eos=True, seed=seed + s)
        for out in llm.stream_outputs(llm.tokenizer.encode_chat(msg), params):
            if current:
                seq.append(dict(current))
                current.clear()
        routing.append(seq[:steps])
    llm.model.routing_hooks.remove(hook)
    a = llm.model.args
    return routing, {"experts": a.n_routed_experts, "top_k": a.num_experts_per_tok,
                     "moe_layers": [i for i in range(a.num_hidden_layers) if a.is_moe(i)]}


def trained_trace(args, routing: list, trained: dict, rows: int, steps: int) -> list:
    """Map the trained model's routing onto a bigger shape: trace[row][step][layer] = experts.

    Bench MoE layer m follows trained MoE layer m mod (trained MoE layers), which keeps each
    layer's place in its sharing group. The shape's E experts are split into E / E_trained
    blocks; block s follows its own recorded sequence (expert e there -> expert s * E_trained + e),
    and of the blocks' picks the top_k with the largest router weights are kept (64 experts,
    top-6, from 16, top-2: four blocks, 8 picks, 6 kept). Temporal locality, popularity skew and
    the overlap of a group's layers are the trained model's."""
    et, kt = trained["experts"], trained["top_k"]
    e, k = args.n_routed_experts, args.num_experts_per_tok
    if e < k or e < et:
        raise ValueError(f"cannot map a trained routing of {et} experts onto {e} experts (top-{k})")
    blocks = max(e // et, -(-k // kt))
    moe = [i for i in range(args.num_hidden_layers) if args.is_moe(i)]
    tl = trained["moe_layers"]
    trace = []
    for r in range(rows):
        row = []
        for t in range(steps):
            step = {}
            for m, layer in enumerate(moe):
                cand: dict[int, float] = {}
                s = 0
                while s < blocks or len(cand) < k:  # (more blocks only where they overlap: E < blocks * E_trained)
                    seq = routing[(r * blocks + s) % len(routing)]
                    for x, w in seq[t % len(seq)][tl[m % len(tl)]]:
                        cand[(s * et + x) % e] = max(cand.get((s * et + x) % e, 0.0), w)
                    s += 1
                step[layer] = [x for x, _ in sorted(cand.items(), key=lambda xw: -xw[1])[:k]]
            row.append(step)
        trace.append(row)
    return trace


def uniform_trace(args, rows: int, steps: int, seed: int = 0) -> list:
    """Experts drawn uniformly at random, independently for every token and layer: no locality
    at all, the worst case for a cache (a random-weight router is not that: its choices follow
    the slowly changing hidden state, so consecutive tokens share experts)."""
    g = torch.Generator().manual_seed(seed)
    moe = [i for i in range(args.num_hidden_layers) if args.is_moe(i)]
    e, k = args.n_routed_experts, args.num_experts_per_tok
    return [[{layer: torch.randperm(e, generator=g)[:k].tolist() for layer in moe} for _ in range(steps)]
            for _ in range(rows)]


def trace_statistics(trace, args) -> dict:
    """Next-token reuse of a layer's experts, the share of the top quarter of experts, and the
    overlap of consecutive layers of a sharing group (the same token)."""
    from .bench_offload import trace_statistics as base

    stats = base(trace, args.num_experts_per_tok, args.n_routed_experts)
    overlap = []
    for row in trace:
        for step in row:
            for layer, experts in step.items():
                prev = layer - 1
                if prev in step and args.owner(prev) == args.owner(layer):
                    overlap.append(len(set(experts) & set(step[prev])) / len(experts))
    stats["group_layer_overlap"] = sum(overlap) / max(len(overlap), 1)
    return stats


class Replay:
    """A routing override substituting a trace's experts for each row (router weights stay)."""

    def __init__(self, trace):
        self.trace, self.step = trace, 0

    def __call__(self, layer, weights, indices):
        rows = [self.trace[r % len(self.trace)][self.step % len(self.trace[0])][layer] for r in range(indices.shape[0])]
        return weights, torch.tensor(rows, dtype=indices.dtype, device=indices.device)


# ------------------------------------------------------------------------------ runs

def decode(model, batch: int, output: int, replay, kv_bytes: int, seed: int = 0):
    """Greedy decode of ``batch`` random prompts: per-step seconds and storage bytes (after two
    warm-up steps), the tokens of every row, and the process's CPU seconds per step (all threads)."""
    from .bench_offload import start_random_decode

    engine, reqs = start_random_decode(model, batch, PROMPT, output, replay, kv_bytes, seed)
    times, reads, cpu = [], [], []
    while engine.running:
        if replay is not None:
            replay.step += 1
        r, t, c = storage_read_bytes(), time.perf_counter(), time.process_time()
        engine.step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        reads.append(storage_read_bytes() - r)
    cpu = cpu[2:] or cpu
    return times[2:] or times, reads[2:] or reads, [list(q.output_ids) for q in reqs], sum(cpu) / len(cpu)


def resolve_budgets(texts: list[str], fixed: int, pool: int, per_expert: int, top_k: int) -> list[tuple[str, int]]:
    """Budget texts: a size, ``min`` (room for one layer's experts), or ``N%`` (that share of the
    routed experts on top of everything else)."""
    out = []
    for text in texts:
        if text == "min":
            out.append((text, fixed + top_k * per_expert))
        elif text.endswith("%"):
            out.append((text, fixed + max(int(float(text[:-1]) / 100 * pool), top_k) * per_expert))
        else:
            out.append((text, parse_bytes(text)))
    return out


def write_checkpoint(shape: str, dtype_name: str, out: str, seed: int) -> None:
    """A random-weight checkpoint of ``shape`` (run in a child process, so the benchmark's own
    memory never held a whole model it then freed)."""
    from .bench import random_model
    from .loading import DTYPES

    dtype = DTYPES[dtype_name]
    save_model(random_model(shape, torch.device("cpu"), dtype, seed=seed), out, dtype=dtype)


def bench_storage(a) -> dict:
    import subprocess
    import sys

    from .bench import device_name, shape_bytes

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype_name = "bfloat16" if a.dtype == "auto" else a.dtype
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype_name]
    scratch = None
    ckpt = Path(a.checkpoint) if a.checkpoint else None
    try:
        if ckpt is None or not (ckpt / "config.json").is_file():
            if ckpt is None:
                if a.scratch_dir is not None and not Path(a.scratch_dir).is_dir():
                    raise ValueError(f"--scratch-dir {a.scratch_dir}: no such directory")
                scratch = Path(tempfile.mkdtemp(prefix="megrez-bench-storage-", dir=a.scratch_dir))
                ckpt = scratch / a.shape
            where = ckpt.parent if ckpt.parent.exists() else Path.cwd()
            need, free = sum(shape_bytes(a.shape, dtype, None).values()), shutil.disk_usage(where).free
            if need > 0.8 * free:
                raise ValueError(f"--shape {a.shape} in {dtype_name} needs {format_bytes(need)} on disk; "
                                 f"{format_bytes(free)} is free in {where} (a smaller --shape, or --scratch-dir)")
            print(f"writing a random {a.shape} checkpoint ({format_bytes(need)}) to {ckpt}", flush=True)
            code = (f"from megrez.bench_storage import write_checkpoint; "
                    f"write_checkpoint({a.shape!r}, {dtype_name!r}, {str(ckpt)!r}, {a.seed})")
            subprocess.run([sys.executable, "-c", code], check=True)
        return _bench(a, ckpt, dtype, device_name(torch.device("cpu")))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _bench(a, ckpt: Path, dtype, cpu: str) -> dict:
    from .loading import read_json
    from .models import build_model

    with torch.device("meta"):  # the runtime first: the modules model code imports (outside any budget)
        build_model(read_json(ckpt / "config.json"))
    gc.collect()
    runtime_rss = _status("VmRSS:")
    files = checkpoint_shards(ckpt)
    for f in files:
        drop_cached(f)
    lean = load_model(ckpt, device="cpu", dtype=dtype, expert_device="meta", progress=False)
    lean_rss = _status("VmRSS:") - runtime_rss  # what a budgeted run holds before its expert cache
    args = lean.args
    store = ExpertStore(lean, files, dtype)
    resident = sum(p.numel() * p.element_size() for n, p in lean.named_parameters() if ".experts." not in n)
    kv = a.kv_cache_memory
    fixed = resident + kv + activation_bytes(args, 1024, max(a.batch))
    per_expert = store.span
    pool = len(store.runs)
    seq_bw = sequential_bandwidth(files[0])
    exp_bw = expert_read_bandwidth(store, a.io_threads)
    bandwidth = max(seq_bw, exp_bw)
    budgets = resolve_budgets(a.budgets, fixed, pool, per_expert, args.num_experts_per_tok)
    steps = a.output + 2
    print(f"{a.shape} ({str(dtype)[6:]}) from {ckpt}: non-expert weights {format_bytes(resident)}, {pool} routed "
          f"experts of {format_bytes(store.expert_bytes)} ({store.reads_per_expert} read each, {store.io_mode}); "
          f"storage read {seq_bw / 1e9:.2f} GB/s sequential, {exp_bw / 1e9:.2f} GB/s in expert reads on "
          f"{a.io_threads} threads", flush=True)
    replays, tstats = {}, {}
    if "uniform" in a.routing:
        trace = uniform_trace(args, max(a.batch), steps + 1, seed=a.seed)
        tstats["uniform"] = trace_statistics(trace, args)
        replays["uniform"] = Replay(trace)
    if "trained" in a.routing:
        routing, trained = record_trained_routing(16, steps + 1, seed=a.seed)
        trace = trained_trace(args, routing, trained, max(a.batch), steps + 1)
        tstats["trained"] = trace_statistics(trace, args)
        replays["trained"] = Replay(trace)
    for name, t in tstats.items():
        print(f"{name} routing: next-token reuse {t['next_token_reuse']:.0%}, top quarter of experts "
              f"{t['top_quarter_share']:.0%} of selections, overlap with the previous layer of the group "
              f"{t['group_layer_overlap']:.0%}", flush=True)
    # The all-in-RAM model stays loaded, so that its compute time is measured next to every
    # budgeted run (the machine's load drifts); a budgeted run's peak RSS is what it grew by
    # over the loaded models plus the lean model's own RSS.
    full = load_model(ckpt, device="cpu", dtype=dtype, progress=False)
    rows = []
    print(HEADER, flush=True)
    for routing, replay in replays.items():
        full.routing_override = lean.routing_override = replay
        for batch in a.batch:
            for rep in range(a.repeat):
                for label, budget in budgets:
                    # All-in-RAM right before and after the budget's modes: their mean is the
                    # compute time of the rows between (the machine's load drifts).
                    times, _, want, cpu = decode(full, batch, a.output, replay, kv, a.seed)
                    ref = {"routing": routing, "batch": batch, "budget": label, "mode": "all-in-RAM", "repeat": rep,
                           "step_ms": 1e3 * sum(times) / len(times), "cpu_ms_per_step": cpu * 1e3}
                    cycle = []
                    for mode in a.modes:
                        cycle.append((mode, _run(lean, store, mode, batch, a, replay, kv, budget - fixed, want)))
                    times, _, _, cpu = decode(full, batch, a.output, replay, kv, a.seed)
                    ref["step_ms"] = (ref["step_ms"] + 1e3 * sum(times) / len(times)) / 2
                    ref["cpu_ms_per_step"] = (ref["cpu_ms_per_step"] + cpu * 1e3) / 2
                    ref["tokens_per_s"] = batch / ref["step_ms"] * 1e3
                    rows.append(ref)
                    print(_line(ref), flush=True)
                    compute = ref["step_ms"] / 1e3
                    for mode, row in cycle:
                        floor = max(compute, row["read_bytes_per_step"] / bandwidth)
                        row.update(routing=routing, budget=label, budget_bytes=budget, repeat=rep,
                                   experts_share=min((budget - fixed) // per_expert, pool) / pool,
                                   peak_rss_bytes=lean_rss + row["rss_growth_bytes"], compute_ms=compute * 1e3,
                                   ceiling_tokens_per_s=batch / floor, of_ceiling=floor / (row["step_ms"] / 1e3),
                                   vs_all_in_ram=ref["step_ms"] / row["step_ms"])
                        row["within_budget"] = row["peak_rss_bytes"] <= budget
                        rows.append(row)
                        print(_line(row), flush=True)
    store.close()
    summary = {"shape": a.shape, "dtype": str(dtype)[6:], "cpu": cpu, "date": time.strftime("%Y-%m-%d %H:%M"),
               "checkpoint_bytes": sum(f.stat().st_size for f in files), "resident_bytes": resident,
               "lean_rss_bytes": lean_rss, "expert_bytes": store.expert_bytes, "experts": pool, "io": store.io_mode,
               "sequential_read_bandwidth": seq_bw, "expert_read_bandwidth": exp_bw, "io_threads": a.io_threads,
               "torch_threads": torch.get_num_threads(), "trace": tstats,
               "budgets": {label: b for label, b in budgets}, "rows": rows}
    print(json.dumps(summary))
    return summary


def _run(model, store, mode, batch, a, replay, kv, cache, want) -> dict:
    for f in store.paths:
        drop_cached(f)
    gc.collect()
    before = _status("VmRSS:")
    reset_peak_rss()
    offload = mmapped = None
    if mode == "mmap":
        mmapped = MmapExperts(model, store, int(cache // store.expert_bytes))
    else:
        offload = ExpertOffload(model, torch.device("cpu"), cache, policy="lru" if mode == "lru" else "group",
                                prefetch=mode != "sync", storage=store, io_threads=a.io_threads)
    try:
        times, reads, tokens, cpu = decode(model, batch, a.output, replay, kv, a.seed)
        growth = _status("VmHWM:") - before
        s = offload.stats if offload is not None else None
    finally:
        if offload is not None:
            offload.detach()
        if mmapped is not None:
            mmapped.detach()
        del offload, mmapped
        gc.collect()
    step = sum(times) / len(times)
    n_steps = len(times) + 2
    row = {"batch": batch, "mode": mode, "tokens_per_s": batch / step, "step_ms": step * 1e3,
           "cpu_ms_per_step": cpu * 1e3, "read_bytes_per_step": sum(reads) / len(reads),
           "read_mib_per_step": sum(reads) / len(reads) / 2 ** 20, "rss_growth_bytes": growth,
           "identical_to_all_in_ram": tokens == want}
    if s is not None:
        row.update(hit_rate=s["hit_rate"], exposed_io_ms_per_step=s["copy_seconds_exposed"] / n_steps * 1e3,
                   io_ms_per_step=s["copy_seconds"] / n_steps * 1e3, slots=s["slots"],
                   read_bandwidth=s["read_bandwidth"], stolen=s["stolen"])
    return row


def _line(r: dict) -> str:
    def f(key, fmt="{:.3g}"):
        v = r.get(key)
        return "-" if v is None else fmt.format(v) if isinstance(v, float) else str(v)
    return " | ".join([f("routing"), f("batch"), f("budget"), f("mode"), f("tokens_per_s"), f("ceiling_tokens_per_s"),
                       f("of_ceiling", "{:.0%}"), f("vs_all_in_ram", "{:.2f}"), f("hit_rate", "{:.0%}"),
                       f("exposed_io_ms_per_step", "{:.1f}"), f("read_mib_per_step", "{:.1f}"),
                       f("cpu_ms_per_step", "{:.0f}"),
                       "-" if r.get("peak_rss_bytes") is None else f"{r['peak_rss_bytes'] / 2 ** 20:.0f}",
                       f("within_budget"), f("identical_to_all_in_ram")])


HEADER = ("routing | batch | budget | mode | tok/s | ceiling tok/s | of ceiling | x all-in-RAM | hit rate | "
          "exposed I/O ms/step | read MiB/step | CPU ms/step | peak RSS MiB | within budget | same tokens")


def add_storage_args(p) -> None:
    g = p.add_argument_group("--tier storage")
    g.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="checkpoint to read (written with random weights of --shape if DIR has none; default: a "
                        "temporary directory, removed afterwards)")
    g.add_argument("--scratch-dir", default=None, metavar="DIR",
                   help="where the temporary checkpoint goes (default: the system's temporary directory)")
    g.add_argument("--io-threads", type=int, default=4, help="I/O threads of the storage tier")
    g.add_argument("--repeat", type=int, default=1, help="run every budget's modes this many times, interleaved")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
