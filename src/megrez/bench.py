"""``megrez bench``: engine speed on a named real model shape with random weights (nothing to
download) or on a checkpoint, next to the hardware ceilings measured in the same run.

    megrez bench --shape megrez2-350m --device cpu --dtype float32 --batch 1 --prompt 128 --output 64
    megrez bench --shape megrez2-3x7b-a3b --device cuda --batch 1 8 32 64 --prompt 128 1024

For every (batch, prompt length) it reports prefill tokens/s and model FLOP utilisation
(against the measured matmul rate), decode tokens/s and time per step, the bytes of weights
and KV cache each decode step really reads (distinct experts counted per layer), the
fraction of the measured memory read bandwidth that implies, and peak memory. The last line
of output is one JSON object with everything.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass

import torch

from .engine import Engine, SamplingParams
from .engine.offload import format_bytes
from .loading import materialize, resolve_device, resolve_dtype
from .models import build_model
from .presets import PRESETS

SHAPES = PRESETS


def shape_bytes(shape: str, dtype: torch.dtype, kv_heads: int | None = None) -> dict:
    """Bytes of a named shape's weights in ``dtype``: routed experts and everything else."""
    config = dict(SHAPES[shape])
    if kv_heads:
        config["num_key_value_heads"] = kv_heads
    with torch.device("meta"):
        model = build_model(config)
    size = torch.empty((), dtype=dtype).element_size()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) * size
    return {"experts": experts, "rest": sum(p.numel() for p in model.parameters()) * size - experts}


def _quantized_bytes(shape: str, scheme: str, kv_heads: int | None = None) -> int:
    from .quant.recipe import scheme_bytes

    config = dict(SHAPES[shape])
    if kv_heads:
        config["num_key_value_heads"] = kv_heads
    with torch.device("meta"):
        model = build_model(config)
    return scheme_bytes(model, scheme)[0]


def require_memory(shape: str, dtype: torch.dtype, device: torch.device, need: int, what: str) -> None:
    """Refuse, before allocating anything, a run that cannot fit in the memory it would use."""
    from .loading import available_host_memory

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_host_memory()
    if free is None or need <= 0.9 * free:
        return
    where = "GPU" if device.type == "cuda" else "host"
    hint = ""
    if device.type == "cpu":
        small = [s for s in ("megrez2-350m", "megrez2-mini") if s in SHAPES and s != shape]
        hint = (f" It is meant for a GPU (--device cuda; none is available here); on this machine try a smaller "
                f"shape: --shape {' or --shape '.join(small)}")
    raise ValueError(f"--shape {shape} in {str(dtype).replace('torch.', '')} needs about {format_bytes(need)} of "
                     f"{where} memory ({what}) and {format_bytes(free)} is available.{hint}")


RANDOM_WEIGHTS = ("quantized", "blocks")


def random_model(shape: str, device: torch.device, dtype: torch.dtype, kv_heads: int | None = None, seed: int = 0,
                 expert_device: torch.device | None = None, quantization: str | None = None,
                 random_weights: str = "quantized"):
    """A model of a named shape with random weights, allocated directly on ``device`` (routed
    experts on ``expert_device`` if given). With ``quantization`` (a scheme of
    ``megrez.quant.recipe``), the weights the scheme quantizes are allocated quantized and
    filled tensor by tensor, never as a float model: ``random_weights="quantized"`` draws the
    float weights a slice of rows at a time and quantizes each slice in place (see
    :func:`fill_random_quantized`); ``"blocks"`` writes random blocks (:func:`fill_random_blocks`:
    instant, and speed does not depend on the values)."""
    if random_weights not in RANDOM_WEIGHTS:
        raise ValueError(f"random_weights must be one of {RANDOM_WEIGHTS}, got {random_weights!r}")
    config = dict(SHAPES[shape])
    if kv_heads:
        config["num_key_value_heads"] = kv_heads
    with torch.device("meta"):
        model = build_model(config)
    if quantization:
        from .quant.modules import quantize_modules
        from .quant.recipe import tensor_types

        quantize_modules(model, tensor_types(model, quantization), device)
    materialize(model, device, dtype, expert_device)
    gens = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0 / model.args.hidden_size ** 0.5, generator=gen)
            else:
                p.normal_(0.0, WEIGHT_STD, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.01, generator=gens[b.device])
        if quantization:
            from .quant.modules import quant_tensors

            qts = list({id(q): q for q in quant_tensors(model).values()}.values())
            gen = torch.Generator().manual_seed(seed + 1)
            if random_weights == "blocks":
                for qt in qts:
                    fill_random_blocks(qt, gen)
            else:
                from tqdm import tqdm

                total = sum(qt.data.numel() // qt.data.shape[-1] * qt.shape[-1] for qt in qts)
                with tqdm(total=total, unit="w", unit_scale=True, desc="quantizing random weights",
                          disable=total < 1e9) as bar:
                    for qt in qts:
                        fill_random_quantized(qt, gen, progress=bar.update)
    model.hf_config = config
    return model.eval().requires_grad_(False)


WEIGHT_STD = 0.02  # the random weights' standard deviation (norms and the router aside)


def fill_random_quantized(qt, gen: torch.Generator, std: float = WEIGHT_STD, progress=None) -> None:
    """normal(0, std) weights quantized into ``qt`` in place, a slice of rows at a time (the C
    quantizer where available, megrez.quant.formats otherwise): the only float copy is one slice
    of at most ``C_CHUNK_WEIGHTS`` weights."""
    from .quant.formats import C_CHUNK_WEIGHTS, quantize_rows

    k = qt.shape[-1]
    rows = qt.data.view(-1, qt.data.shape[-1])
    step = max(1, min(rows.shape[0], C_CHUNK_WEIGHTS // k))
    buf = torch.empty(step, k)
    out = torch.empty(step, rows.shape[1], dtype=torch.uint8) if rows.device.type != "cpu" else None
    for start in range(0, rows.shape[0], step):
        n = min(step, rows.shape[0] - start)
        x = buf[:n].normal_(0.0, std, generator=gen)
        if out is None:
            quantize_rows(x, qt.qtype, rows[start:start + n])
        else:
            quantize_rows(x, qt.qtype, out[:n])
            rows[start:start + n].copy_(out[:n])
        if progress is not None:
            progress(n * k)


# Block scales that make random quants weights of about 0.02 (the init above): Q8_0 |q| ~ 64,
# Q4_0 |q - 8| ~ 4, Q5_0 |q - 16| ~ 8, Q4_K d * sc * q with sc ~ 32 and q ~ 7.5, Q6_K |sc| ~ 64 and
# |q - 32| ~ 16. (qtype name, byte offset of the fp16 scale) -> scale
_RANDOM_SCALES = {("Q8_0", 0): 0.02 / 64, ("Q4_0", 0): 0.02 / 4, ("Q5_0", 0): 0.02 / 8,
                  ("Q4_K", 0): 0.02 / 32 / 7.5, ("Q4_K", 2): 0.02 / 32, ("Q6_K", 208): 0.02 / 64 / 16}


def fill_random_blocks(qt, gen: torch.Generator) -> None:
    """Random quants in place, with fixed block scales that give weights of about 0.02. The
    speed of a quantized product does not depend on the values, and this takes a fraction of a
    second where quantizing random floats by ggml's algorithms takes minutes per billion."""
    import numpy as np

    from .quant.formats import BLOCK_SIZES

    block, nbytes = BLOCK_SIZES[qt.qtype]
    blocks = qt.data.view(-1, qt.shape[-1] // block, nbytes)
    blocks.random_(0, 256, generator=gen)
    for (name, offset), scale in _RANDOM_SCALES.items():
        if name == qt.qtype.name:
            blocks[..., offset:offset + 2] = torch.from_numpy(np.array([scale], np.float16).view(np.uint8))


# ------------------------------------------------------------------------------ hardware ceilings

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def measure_read_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Bytes/s of the fastest pure reads we can issue over a buffer far larger than any cache:
    a reduction, torch's matrix-vector product and (CPU) the decode kernel's and a C read with
    two streams per thread (kernels/read_probe.c)."""
    from . import kernels

    nbytes = nbytes or ((4 << 30) if device.type == "cuda" else (1 << 30))
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    out = {"reduce": nbytes / best_time(lambda: x.sum(), device)}
    w = x.view(-1, 4096)
    v = torch.ones(1, 4096, dtype=torch.float32, device=device)
    out["matvec"] = nbytes / best_time(lambda: torch.mv(w, v[0]), device)
    if device.type == "cpu" and (lib := kernels.load()) is not None:
        with torch.inference_mode():
            out["kernel"] = nbytes / best_time(lambda: kernels.linear(v, w), device)
        threads = torch.get_num_threads()
        out["streams"] = nbytes / best_time(lambda: lib.megrez_read_probe(x.data_ptr(), x.numel(), 2, threads), device)
    return {**out, "best": max(out.values())}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / best_time(lambda: a @ b, device, reps=10 if device.type == "cuda" else 3)


# ------------------------------------------------------------------------------ accounting

def _stored_tensors(model):
    """(name, bytes) of every weight as stored: float parameters and quantized tensors
    (QuantTensor attributes of quantized modules) alike, shared tensors once."""
    from .quant.formats import QuantTensor

    seen = set()
    for name, p in model.named_parameters():
        seen.add(p.data_ptr())
        yield name, p.numel() * p.element_size()
    for mod_name, mod in model.named_modules():
        for attr, v in vars(mod).items():
            if isinstance(v, QuantTensor) and v.data.data_ptr() not in seen:
                seen.add(v.data.data_ptr())
                yield f"{mod_name}.{attr}", v.nbytes


def weight_bytes(model) -> dict:
    """Bytes of weights per category, as stored (quantized weights at their quantized size):
    everything but routed experts and the embedding table, one routed expert (the mean over the
    banks), one embedding row."""
    a = model.args
    tensors = dict(_stored_tensors(model))
    bank_names = [n for n in tensors if ".experts." in n]
    banks = sum(tensors[n] for n in bank_names)
    n_banks = len(bank_names) // 3
    expert = banks / (n_banks * a.n_routed_experts) if n_banks else 0
    embed = tensors["model.embed_tokens.weight"]
    dense = sum(tensors.values()) - banks - embed
    if a.tie_word_embeddings:
        dense += embed  # the tied table is read in full by the LM head
    return {"dense": dense, "expert": expert, "embed_row": embed / a.vocab_size}


class ExpertCounter:
    """Counts the distinct experts each layer routes to, per forward pass. The hook only keeps
    the routing; counting (a torch operator per layer, 0.1-0.2 ms of a few-millisecond step)
    waits for take(), outside the timed step."""

    def __init__(self, model):
        self.routings: list[torch.Tensor] = []
        if hasattr(model, "routing_hooks"):
            model.routing_hooks.append(self)

    def __call__(self, layer, indices, weights):
        self.routings.append(indices)

    def take(self) -> int:
        n = sum(int(i.unique().numel()) for i in self.routings)
        self.routings = []
        return n


def parameter_counts(model) -> dict[str, int]:
    """Stored and active parameters; a quantized model is counted as the float model of its
    config (its quantized tensors are not torch parameters)."""
    from .quant.formats import QuantTensor

    if any(isinstance(v, QuantTensor) for m in model.modules() for v in vars(m).values()):
        with torch.device("meta"):
            return build_model(model.hf_config).parameter_counts()
    return model.parameter_counts()


def flops_per_token(model, context: int) -> float:
    """Model FLOPs of one token's forward pass at a given context length (matmuls + attention)."""
    counts = parameter_counts(model)
    a = model.args
    matmul_params = counts["active"] - a.vocab_size * a.hidden_size * (0 if a.tie_word_embeddings else 1)
    attention = 4 * a.num_hidden_layers * a.num_attention_heads * a.head_dim * context
    return 2 * matmul_params + attention


# ------------------------------------------------------------------------------ runs

@dataclass
class Result:
    batch: int
    prompt: int
    output: int
    prefill_tokens_per_s: float
    prefill_mfu: float
    decode_tokens_per_s: float
    decode_step_ms: float
    bytes_per_step: float
    bandwidth_fraction: float
    peak_memory_gib: float


def peak_memory(device: torch.device) -> float:
    """GiB: the GPU's peak allocation, or this process's peak resident set (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return peak_rss_gib()


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux: ru_maxrss in KiB, /proc/self/status VmHWM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """(read bandwidth probes, ceilings) of this device."""
    bw = measure_read_bandwidth(device)
    return bw, {"read_bandwidth": bw["best"], **{f"read_bandwidth_{k}": v for k, v in bw.items() if k != "best"},
                "matmul_flops": measure_matmul_flops(device, dtype)}


def quantized_weight_bytes(model) -> int:
    return sum(n for _, n in _stored_tensors(model))


def run_case(model, batch: int, prompt: int, output: int, ceilings: dict, seed: int = 0) -> Result:
    device = next(model.parameters()).device
    engine = Engine(model, None, max_num_seqs=batch, max_model_len=prompt + output + 1,
                    kv_cache_memory=1 << 50)
    gen = torch.Generator().manual_seed(seed)
    counter = ExpertCounter(model)
    try:
        for b in range(batch):
            ids = torch.randint(0, model.args.vocab_size, (prompt,), generator=gen).tolist()
            engine.add_request(ids, SamplingParams(temperature=0, max_tokens=output, ignore_eos=True, seed=b))
        sync(device)
        t = time.perf_counter()
        engine.step()  # prefill of every request, and its first token
        sync(device)
        prefill_s = time.perf_counter() - t
        counter.take()
        wb = weight_bytes(model)
        layers, n_kv, head_dim = model.kv_layout()
        kv_token = 2 * layers * n_kv * head_dim * next(model.parameters()).element_size()
        steps, step_bytes = [], []
        position = prompt
        while engine.running:
            sync(device)
            t = time.perf_counter()
            engine.step()
            sync(device)
            steps.append(time.perf_counter() - t)
            step_bytes.append(wb["dense"] + batch * wb["embed_row"] + counter.take() * wb["expert"]
                              + batch * (position + 1) * kv_token)
            position += 1
    finally:
        if counter in getattr(model, "routing_hooks", []):
            model.routing_hooks.remove(counter)
    warm = slice(min(2, len(steps) - 1), None)  # the first steps pay one-off allocations
    step_s = sum(steps[warm]) / len(steps[warm])
    bytes_step = sum(step_bytes[warm]) / len(step_bytes[warm])
    flops = batch * sum(flops_per_token(model, c) for c in range(1, prompt + 1))
    return Result(batch, prompt, output, batch * prompt / prefill_s, flops / prefill_s / ceilings["matmul_flops"],
                  batch / step_s, step_s * 1e3, bytes_step, bytes_step / step_s / ceilings["read_bandwidth"],
                  peak_memory(device))


def bench(a) -> dict:
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        from .loading import load_model, read_json, resolve_model_path

        dtype = resolve_dtype(a.dtype, read_json(resolve_model_path(a.model) / "config.json"), device)
        model = load_model(a.model, device=device, dtype=dtype, quantization=a.quantization)
        name = str(a.model) + (f" ({a.quantization})" if a.quantization else "")
    else:
        dtype = resolve_dtype(a.dtype, {"torch_dtype": "bfloat16"}, device)
        need = _quantized_bytes(a.shape, a.quantization, a.kv_heads) if a.quantization else \
            sum(shape_bytes(a.shape, dtype, a.kv_heads).values())
        require_memory(a.shape, dtype, device, need, "its weights")
        # The ceilings first: the probe's buffer is freed before the model exists, so the peak
        # memory reported is the model's (with --model it is measured after loading).
        bw, ceilings = measure_ceilings(device, dtype)
        t = time.perf_counter()
        model = random_model(a.shape, device, dtype, a.kv_heads, quantization=a.quantization,
                             random_weights=a.random_weights)
        built_s = time.perf_counter() - t
        name = a.shape + (f" ({a.quantization})" if a.quantization else "")
    if a.model:
        bw, ceilings = measure_ceilings(device, dtype)
    built = {"peak_rss_gib_after_build": peak_rss_gib()}
    counts = parameter_counts(model)
    wb = weight_bytes(model)
    header = {"model": name, "device": str(device), "device_name": device_name(device), "dtype": str(dtype),
              "threads": torch.get_num_threads(), "stored_params": counts["stored"], "active_params": counts["active"],
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, **ceilings, **built}
    print(f"{name}: {counts['stored'] / 1e6:.0f}M stored / {counts['active'] / 1e6:.0f}M active parameters, "
          f"{dtype}, {header['device_name']}, {header['threads']} threads")
    if not a.model:
        header["build_s"] = built_s
        how = f", random weights {a.random_weights}" if a.quantization else ""
        print(f"built in {built_s:.1f} s{how}; weights {format_bytes(quantized_weight_bytes(model))}, "
              f"peak RSS so far {built['peak_rss_gib_after_build']:.2f} GiB")
    probes = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.items() if k != "best")
    print(f"measured: read bandwidth {bw['best'] / 1e9:.1f} GB/s ({probes}), "
          f"matmul {ceilings['matmul_flops'] / 1e12:.2f} TFLOP/s")
    print(f"weights read per decode step: {wb['dense'] / 1e6:.0f} MB non-expert "
          f"+ {wb['expert'] / 1e6:.2f} MB per distinct routed expert per layer + KV cache")
    results, baseline = [], []
    for prompt in a.prompt:
        for batch in a.batch:
            run_case(model, batch, min(prompt, 16), 4, ceilings)  # warm-up: kernels, allocator
            r = run_case(model, batch, prompt, a.output, ceilings)
            results.append(r)
            if a.torch_baseline and device.type == "cpu":
                from . import kernels

                kernels.enabled = False
                try:
                    baseline.append(run_case(model, batch, prompt, a.output, ceilings))
                finally:
                    kernels.enabled = True
    cols = ("batch", "prompt", "prefill tok/s", "prefill MFU", "decode tok/s", "step ms", "MB/step", "of BW",
            "peak GiB")
    print(" | ".join(cols))
    for r in results:
        print(f"{r.batch:5d} | {r.prompt:6d} | {r.prefill_tokens_per_s:13.1f} | {r.prefill_mfu:11.1%} | "
              f"{r.decode_tokens_per_s:12.1f} | {r.decode_step_ms:7.2f} | {r.bytes_per_step / 1e6:7.1f} | "
              f"{r.bandwidth_fraction:6.1%} | {r.peak_memory_gib:8.2f}")
    for b in baseline:
        mine = next(r for r in results if (r.batch, r.prompt) == (b.batch, b.prompt))
        print(f"torch baseline (no decode kernels), batch {b.batch}, prompt {b.prompt}: decode "
              f"{b.decode_tokens_per_s:.1f} tok/s ({b.bandwidth_fraction:.1%} of BW); the engine is "
              f"{mine.decode_tokens_per_s / b.decode_tokens_per_s:.2f}x faster")
    hf = []
    if a.hf_baseline:
        for prompt in a.prompt:
            for batch in a.batch:
                h = hf_generate_baseline(model, batch, prompt, a.output)
                mine = next(r for r in results if (r.batch, r.prompt) == (batch, prompt))
                h["engine_speedup"] = mine.decode_tokens_per_s / h["decode_tokens_per_s"]
                hf.append(h)
                print(f"transformers generate, batch {batch}, prompt {prompt}: decode {h['decode_tokens_per_s']:.1f} "
                      f"tok/s; the engine is {h['engine_speedup']:.2f}x faster")
    summary = {**header, "output": a.output, "results": [asdict(r) for r in results],
               "torch_baseline": [asdict(b) for b in baseline], "transformers_baseline": hf}
    print(json.dumps(summary))
    return summary


def hf_generate_baseline(model, batch: int, prompt: int, output: int) -> dict:
    """Hugging Face transformers' LlamaForCausalLM.generate on the same weights (shared, not
    copied): decode tokens/s from a full generate minus a one-token generate."""
    import transformers

    if type(model).__module__.rsplit(".", 1)[-1] != "llama":
        raise ValueError("--hf-baseline needs a Llama shape (transformers has no Megrez2 model)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    config = transformers.LlamaConfig(**{k: v for k, v in model.hf_config.items() if k != "architectures"})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # its rotary buffers must be real; the weights are replaced below
            hf = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    hf.load_state_dict(model.state_dict(), assign=True, strict=False)
    hf.eval()
    ids = torch.randint(0, model.args.vocab_size, (batch, prompt), device=device)

    def run(n):
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)

    run(2)  # warm-up
    one = best_time(lambda: run(1), device, reps=2)
    full = best_time(lambda: run(output), device, reps=2)
    return {"batch": batch, "prompt": prompt, "output": output,
            "decode_tokens_per_s": batch * (output - 1) / max(full - one, 1e-9)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def register(sub) -> None:
    from .cli import device_arg

    p = sub.add_parser("bench", help="measure prefill/decode speed against measured hardware ceilings")
    p.add_argument("--shape", default="megrez2-350m", choices=sorted(SHAPES),
                   help="named model shape with random weights (megrez.presets; default: megrez2-350m)")
    p.add_argument("--model", default=None, help="benchmark a checkpoint instead of a random shape")
    p.add_argument("--kv-heads", type=int, default=None, help="override the shape's KV head count")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and compute dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to run (sequences decoded together)")
    p.add_argument("--prompt", type=int, nargs="+", default=[128], help="prompt lengths to run, in tokens")
    p.add_argument("--output", type=int, default=64, help="tokens to decode per sequence")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--quantization", default=None, choices=["q8_0", "q4_0", "q4_k_m"],
                   help="quantize the weights in llama.cpp's type mix for the scheme (random shapes: allocated "
                        "quantized, see --random-weights)")
    p.add_argument("--random-weights", default="quantized", choices=RANDOM_WEIGHTS,
                   help="random shapes with --quantization: 'quantized' draws float weights a slice at a time and "
                        "quantizes them (never a float model; minutes for billions of weights), 'blocks' writes "
                        "random quantized blocks (instant; speed does not depend on the values)")
    p.add_argument("--hf-baseline", action="store_true",
                   help="Llama shapes: also time transformers' generate on the same weights and report the ratio")
    p.add_argument("--torch-baseline", action="store_true",
                   help="CPU: also run each case on torch's own matmuls (decode kernels off) and report the ratio")
    p.set_defaults(func=lambda a: bench(a) and 0)
