"""The storage tier of expert offloading (--memory-budget): routed experts read from the
checkpoint files into a RAM cache must change nothing but where the experts live; a file that
changes under the running model is an error naming it; the memory budget holds."""
import json
import os
import shutil
import struct
import sys
import textwrap
from collections import Counter
from types import SimpleNamespace

import pytest
import timing
import torch

from megrez import LLM, SamplingParams
from megrez.engine.storage import ExpertStore
from megrez.llm import activation_bytes
from megrez.loading import CheckpointError, load_model
from megrez.loading.safetensors import SafetensorsFile
from megrez.tiny import create_tiny

PROMPT = [5, 77, 300, 12, 640, 9, 81, 433, 2, 150, 700, 61, 18, 290, 404, 33]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
BATCH = [PROMPT, PROMPT[:5], PROMPT[3:9]]
KV = 4 << 20


def fixed_bytes(llm_or_model) -> int:
    """What a memory budget holds besides the expert slots (non-expert weights, KV, activations)."""
    model = llm_or_model.model if isinstance(llm_or_model, LLM) else llm_or_model
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    return weights + KV + activation_bytes(model.args, 1024, 16)


def budget_for(path, slots: int, **kw) -> int:
    model = load_model(path, device="cpu", expert_device="meta")
    store = ExpertStore(model, [p for p in sorted(path.glob("*.safetensors"))], model.model.embed_tokens.weight.dtype)
    per_slot = store.span if store.views else store.expert_bytes
    staging = 0 if store.views else kw.get("io_threads", 4) * store.span
    store.close()
    return fixed_bytes(model) + staging + slots * per_slot


def storage_llm(path, slots: int, **kw):
    llm = LLM(path, memory_budget=budget_for(path, slots, **kw), kv_cache_memory=KV, **kw)
    assert llm.offload.cache.num_slots == slots and llm.offload.tier == "storage-to-ram"
    return llm


@pytest.fixture(scope="module")
def reference(tiny_moe):
    llm = LLM(tiny_moe, device="cpu")
    return llm.generate(PROMPT, GREEDY).token_ids, [c.token_ids for c in llm.generate(BATCH, GREEDY)]


@pytest.mark.parametrize("slots,kw", [
    (32, {}),                                          # every expert of both groups fits
    (8, {}),                                           # half a group: eviction on every layer
    (8, {"offload_policy": "lru"}),
    (4, {}),                                           # one layer's top-4: prefill streams through
    (5, {"prefetch": False}),                          # reads only when a layer needs them
    (6, {"offload_policy": "lru", "io_threads": 1}),
])
def test_greedy_tokens_identical_to_all_in_ram(tiny_moe, reference, slots, kw):
    llm = storage_llm(tiny_moe, slots, **kw)
    assert llm.generate(PROMPT, GREEDY).token_ids == reference[0]
    assert [c.token_ids for c in llm.generate(BATCH, GREEDY)] == reference[1]  # the union of 3 rows' experts
    s = llm.offload.stats
    assert s["io"] == "O_DIRECT" and s["reads_per_expert"] == 1 and s["slot_views"]
    assert s["hits"] + s["prefetched"] + s["misses"] == s["uses"] > 0
    assert s["bytes_copied"] == (s["prefetched"] + s["misses"]) * llm.offload.cache.expert_bytes
    assert s["reads"] == s["prefetched"] + s["misses"]
    assert s["bytes_read"] >= s["bytes_copied"] and s["read_bandwidth"] > 0
    if kw.get("prefetch") is False:
        assert s["prefetched"] == 0 and s["misses"] > 0
    else:
        assert s["prefetched"] > 0
    if slots == 32:
        assert s["misses"] == 0 and s["reads"] <= 32  # each expert read once, named by the pre-gate
    assert all(layer in range(1, 7) for layer in s["per_layer_stall_seconds"])


def test_widened_from_bfloat16_and_buffered_reads():
    """The bundled model is stored in bfloat16 and computed in float32 on a CPU: experts are
    widened on the I/O threads; buffered reads (what a file system refusing O_DIRECT gets)
    drop the pages they read."""
    from megrez.llm import default_model

    path = default_model()
    ref = LLM(path, device="cpu")
    want = ref.generate(PROMPT, GREEDY).token_ids
    for direct in (True, False):
        llm = storage_llm(path, 5, direct_io=direct)
        assert llm.generate(PROMPT, GREEDY).token_ids == want
        s = llm.offload.stats
        assert not s["slot_views"] and s["misses"] + s["prefetched"] > 0
        assert s["io"] == ("O_DIRECT" if direct else "buffered+POSIX_FADV_DONTNEED")


def write_safetensors(path, tensors: dict, order: list[str]) -> None:
    """A safetensors file with its tensors in ``order`` (writers sort by name; this one does not)."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16"}
    header, offset, blobs = {}, 0, []
    for key in order:
        t = tensors[key].contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)


def test_projection_major_layout_reads_each_projection(tiny_moe, reference, tmp_path):
    """All gate_proj tensors first, then all up_proj, then down_proj: an expert is three
    reads, and nothing else changes."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_moe, out)
    f = SafetensorsFile(out / "model.safetensors")
    tensors = {k: f.read(k) for k in f.keys()}
    rank = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}
    proj = lambda k: next((v for p, v in rank.items() if f".{p}." in k and ".experts." in k), -1)  # noqa: E731
    write_safetensors(out / "model.safetensors", tensors, sorted(tensors, key=lambda k: (proj(k), k)))
    llm = storage_llm(out, 8)
    assert llm.offload.stats["reads_per_expert"] == 3
    assert llm.generate(PROMPT, GREEDY).token_ids == reference[0]
    assert llm.offload.stats["reads"] == 3 * (llm.offload.stats["prefetched"] + llm.offload.stats["misses"])


@pytest.fixture
def private_copy(tiny_moe, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_moe, out)
    return out


def expert_range(path, key: str):
    f = SafetensorsFile(path)
    _, _, begin, end = f.entries[key]
    return f.data_start + begin, f.data_start + end


def test_truncated_file_during_a_run_is_an_error(private_copy):
    llm = storage_llm(private_copy, 4)
    llm.generate(PROMPT[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    weights = private_copy / "model.safetensors"
    start, _ = expert_range(weights, "model.layers.4.mlp.experts.0.gate_proj.weight")
    os.truncate(weights, start)  # every expert of the second group is gone
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the checkpoint changed on disk .* truncated"):
        llm.generate(PROMPT, GREEDY)


def test_rewritten_file_during_a_run_is_an_error(private_copy):
    llm = storage_llm(private_copy, 4)
    llm.generate(PROMPT[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    weights = private_copy / "model.safetensors"
    start, end = expert_range(weights, "model.layers.1.mlp.experts.3.up_proj.weight")
    with open(weights, "r+b") as f:  # same size, other values
        f.seek(start)
        f.write(os.urandom(end - start))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the checkpoint changed on disk .* modified"):
        llm.generate(PROMPT, GREEDY)


def test_changed_bytes_are_caught_by_the_checksum(private_copy):
    """A change that even keeps the modification time is caught when an expert read before
    is read again."""
    llm = storage_llm(private_copy, 4)
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    read = list(llm.offload.cache.transfer._checksums)  # experts read so far
    weights = private_copy / "model.safetensors"
    st = os.stat(weights)
    with open(weights, "r+b") as f:
        for owner, expert in read:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                start, end = expert_range(weights, f"model.layers.{owner}.mlp.experts.{expert}.{proj}.weight")
                f.seek(start)
                f.write(torch.randn((end - start) // 4).numpy().tobytes())
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the bytes of routed expert \d+ of layer \d "
                                              r"differ from those read from this file earlier"):
        for _ in range(4):
            llm.generate(PROMPT, GREEDY)


def test_budget_and_combination_errors(tiny_moe, tiny_dense):
    with pytest.raises(ValueError, match="too small.*one layer needs"):
        LLM(tiny_moe, memory_budget=budget_for(tiny_moe, 3), kv_cache_memory=KV)
    with pytest.raises(ValueError, match="cannot be combined"):
        LLM(tiny_moe, memory_budget="1GiB", gpu_memory_budget="1GiB")
    with pytest.raises(ValueError, match="needs a Megrez2"):
        LLM(tiny_dense, memory_budget="1GiB")
    with pytest.raises(ValueError, match="on a GPU use --gpu-memory-budget"):
        LLM(tiny_moe, memory_budget="1GiB", device="cuda:0")


def test_verbose_and_metrics_report_the_storage_tier(tiny_moe, capsys):
    from megrez.cli import main
    from megrez.server.metrics import Histogram, render

    budget = budget_for(tiny_moe, 6)
    assert main(["generate", "--model", str(tiny_moe), "--prompt-ids", "5,77,300", "--max-tokens", "4",
                 "--temperature", "0", "--memory-budget", str(budget), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "expert cache (storage-to-ram, group, float32 experts): " in err and "O_DIRECT" in err and "exposed" in err
    llm = storage_llm(tiny_moe, 6)
    llm.generate(PROMPT[:3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    loop = SimpleNamespace(engine=llm.engine, finished=Counter(), ttft=Histogram((1.0,)), latency=Histogram((1.0,)))
    text = render(loop, Counter(), "tiny")
    s = llm.offload.stats
    assert f"megrez_expert_read_bytes_total {s['bytes_read']}" in text
    assert "megrez_expert_read_bandwidth_bytes_per_second" in text and 'megrez_expert_stall_seconds_total{layer="' in text


RSS_CHILD = textwrap.dedent("""
    import json, sys
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    import torch
    from megrez import LLM, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    path, budget, warm = sys.argv[1], (int(sys.argv[2]) if sys.argv[2] != "none" else None), sys.argv[3]
    torch.set_num_threads(1)
    # The runtime first (Python, torch, the modules model code and generation import): the same
    # few hundred MiB whatever the model, and outside any budget.
    LLM(warm, device="cpu", memory_budget=budget and 64 << 20, kv_cache_memory=4 << 20).generate([5, 6], params)
    import gc
    gc.collect()
    before = status("VmRSS:")
    llm = LLM(path, device="cpu", memory_budget=budget, kv_cache_memory=4 << 20, max_num_seqs=4)
    tokens = llm.generate([list(range(5, 69)), [7, 8, 9], [10, 11], [12]], params)
    print(json.dumps({"before": before, "peak": status("VmHWM:"), "tokens": [t.token_ids for t in tokens],
                      "stats": llm.offload.stats if llm.offload else None}))
""")


@pytest.fixture(scope="module")
def wide_moe(tmp_path_factory):
    """192 MiB of routed experts (2 groups x 64 experts x 1.5 MiB), 14 MiB of the rest."""
    return create_tiny(tmp_path_factory.mktemp("ckpt") / "wide-moe", arch="moe",
                       overrides={"hidden_size": 256, "moe_intermediate_size": 512, "intermediate_size": 512,
                                  "n_routed_experts": 64, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
                                  "n_shared_experts": 1})


RSS_OVERHEAD = 24 << 20  # beyond the budget: allocator slack, the tokenizer, thread stacks, Python objects


@pytest.fixture(scope="module")
def wide_gguf(wide_moe, tmp_path_factory):
    """wide_moe as a Q8_0 GGUF file: 51 MiB of routed experts, 4 MiB of the rest."""
    from megrez.loading.gguf import write_gguf

    model = load_model(wide_moe, device="cpu", quantization="q8_0")
    return write_gguf(model, tmp_path_factory.mktemp("gguf") / "wide-q8_0.gguf", "q8_0", wide_moe, progress=False)


@pytest.mark.parametrize("kind,budget", [("safetensors", 72 << 20), ("gguf", 48 << 20)])
def test_rss_stays_within_the_budget(kind, budget, wide_moe, tiny_moe, request):
    path = wide_moe if kind == "safetensors" else request.getfixturevalue("wide_gguf")

    def child(budget):
        out = timing.run([sys.executable, "-c", RSS_CHILD, str(path), str(budget), str(tiny_moe)], timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    checkpoint = (path / "model.safetensors").stat().st_size if kind == "safetensors" else path.stat().st_size
    free = child("none")
    capped = child(budget)
    assert capped["tokens"] == free["tokens"]
    # The measure can tell: without the budget it is all in RAM (and only once: a GGUF file is
    # read, not kept mapped beside the copy).
    assert checkpoint < free["peak"] - free["before"] < 2 * checkpoint
    s = capped["stats"]
    assert 4 <= s["slots"] <= 32 and s["misses"] + s["prefetched"] > s["slots"]  # 128 experts went in and out
    grew = capped["peak"] - capped["before"]
    print(f"RSS grew by {grew / 2**20:.1f} MiB under a budget of {budget / 2**20:.0f} MiB "
          f"(checkpoint {checkpoint / 2**20:.0f} MiB)")
    assert grew <= budget + RSS_OVERHEAD, (capped, budget)


# ---------------------------------------------------------------------------------- GGUF

@pytest.fixture(scope="module")
def gguf_moe(tmp_path_factory):
    """A Q4_K_M GGUF file of a Megrez2 wide enough for K-quants (256-wide rows)."""
    from megrez.loading.gguf import write_gguf

    d = tmp_path_factory.mktemp("gguf")
    path = create_tiny(d / "moe", arch="moe", overrides={"hidden_size": 256, "moe_intermediate_size": 256,
                                                         "intermediate_size": 256})
    model = load_model(path, device="cpu", quantization="q4_k_m")
    return write_gguf(model, d / "moe-q4_k_m.gguf", "q4_k_m", path, progress=False)


def gguf_budget(path, slots: int) -> int:
    from megrez.loading.gguf import GGUFCheckpoint
    from megrez.quant.modules import quant_tensors

    model = load_model(path, device="cpu", expert_device="meta")
    store = ExpertStore(model, [GGUFCheckpoint(path)], torch.float32)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    weights += sum({qt.data.data_ptr(): qt.nbytes for qt in quant_tensors(model).values()}.values())
    store.close()
    return weights + KV + activation_bytes(model.args, 1024, 16) + slots * store.span


@pytest.mark.parametrize("slots", [32, 8, 4])
def test_quantized_experts_read_from_a_gguf_file_give_the_same_tokens(gguf_moe, slots):
    full = LLM(gguf_moe, device="cpu")
    assert {type(full.model.layers[1].mlp.experts.gate_proj).__name__} == {"QuantTensor"}
    want = full.generate(PROMPT, GREEDY).token_ids, [c.token_ids for c in full.generate(BATCH, GREEDY)]
    llm = LLM(gguf_moe, memory_budget=gguf_budget(gguf_moe, slots), kv_cache_memory=KV)
    assert llm.offload.cache.num_slots == slots and llm.offload.tier == "storage-to-ram"
    assert llm.generate(PROMPT, GREEDY).token_ids == want[0]
    assert [c.token_ids for c in llm.generate(BATCH, GREEDY)] == want[1]
    s = llm.offload.stats
    # Read as the file stores them (one slice of each stacked projection), never widened (the
    # owner layers, 1 and 4 of 6, are not among those the _M recipe gives Q6_K).
    assert s["expert_types"] == ["Q4_K"] and s["slot_views"] and s["reads_per_expert"] == 3
    assert s["reads"] == 3 * (s["prefetched"] + s["misses"]) and s["bytes_read"] >= s["bytes_copied"] > 0
    expert = llm.offload.cache.expert_bytes
    assert expert < 3 * 256 * 256 * 4 / 5  # about 4.5-6.5 bits a weight, not 32
    if slots < 32:
        assert s["misses"] + s["prefetched"] > slots  # experts went in and out


def test_quantizing_on_load_under_a_budget_says_how_to_get_a_quantized_file(tiny_moe):
    with pytest.raises(ValueError, match=r"megrez quantize MODEL OUT\.gguf --type q8_0"):
        LLM(tiny_moe, memory_budget="1GiB", quantization="q8_0")
