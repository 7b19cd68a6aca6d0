"""Expert offloading (host-resident experts, a device expert cache fed by the pre-gate).
On CPU the "device" is host memory too, which checks everything but the overlap of copies."""
import pytest

from megrez import LLM, SamplingParams
from megrez.engine.offload import GroupPolicy, LRUPolicy, parse_bytes

PROMPT = [5, 77, 300, 12, 640, 9, 81, 433, 2, 150, 700, 61, 18, 290, 404, 33]


def expert_bytes(llm):
    a = llm.model.args
    return 3 * a.hidden_size * a.moe_intermediate_size * 4


def nonexpert_bytes(llm):
    return sum(p.numel() * 4 for n, p in llm.model.named_parameters() if ".experts." not in n)


@pytest.fixture(scope="module")
def reference(tiny_moe):
    llm = LLM(tiny_moe, device="cpu")
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    return [llm.generate(PROMPT, greedy).token_ids, llm.generate([PROMPT, PROMPT[:5]], greedy)]


def offloaded(tiny_moe, slots, **kw):
    probe = LLM(tiny_moe, device="cpu")
    kv = 4 << 20
    budget = nonexpert_bytes(probe) + kv + slots * expert_bytes(probe)
    return LLM(tiny_moe, device="cpu", gpu_memory_budget=budget, kv_cache_memory=kv, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("slots,kw", [
    (32, {}),                                   # every expert of both groups fits
    (8, {}),                                    # half a group: eviction on every layer
    (4, {"offload_policy": "lru"}),              # exactly one layer's top-4
    (6, {"prefetch": False}),                    # cache only
])
def test_greedy_tokens_identical_to_all_on_device(tiny_moe, reference, slots, kw):
    llm = offloaded(tiny_moe, slots, **kw)
    assert llm.offload.cache.num_slots == slots
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    assert llm.generate(PROMPT, greedy).token_ids == reference[0]
    batch = llm.generate([PROMPT, PROMPT[:5]], greedy)  # the union of two rows' experts per layer
    assert [c.token_ids for c in batch] == [c.token_ids for c in reference[1]]
    s = llm.offload.stats
    assert s["hits"] + s["prefetched"] + s["misses"] == s["uses"] > 0
    if kw.get("prefetch") is False:
        assert s["prefetched"] == 0 and s["misses"] > 0
    if slots == 32:
        assert s["misses"] == 0  # the pre-gate named every expert before its layer needed it
        assert s["bytes_copied"] <= 32 * expert_bytes(llm)  # each expert copied once, then reused


def test_prefill_streams_experts_through_a_small_cache(tiny_moe, reference):
    # 16 prompt tokens need most of a layer's 16 experts; the cache holds 4.
    llm = offloaded(tiny_moe, 4)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    assert out.token_ids == reference[0]


def test_group_sharing_is_reused_without_copies(tiny_moe):
    llm = offloaded(tiny_moe, 32)
    llm.generate(PROMPT[:3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    llm.offload.reset_stats()
    llm.generate(PROMPT[:3], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    s = llm.offload.stats
    assert s["hit_rate"] > 0.5 and s["hits"] > s["prefetched"] + s["misses"]


def test_naive_baseline_reuses_nothing(tiny_moe):
    from megrez.engine.offload import ExpertOffload

    llm = LLM(tiny_moe, device="cpu", gpu_memory_budget=nonexpert_bytes(LLM(tiny_moe)) + (4 << 20) + 32 * 24576,
              kv_cache_memory=4 << 20, prefetch=False)
    assert isinstance(llm.offload, ExpertOffload)
    llm.offload.cache.reuse = False
    llm.generate(PROMPT[:3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    s = llm.offload.stats
    assert s["hits"] == 0 and s["misses"] == s["uses"]


def test_budget_errors(tiny_moe):
    llm = LLM(tiny_moe)
    with pytest.raises(ValueError, match="too small.*one layer needs"):
        LLM(tiny_moe, gpu_memory_budget=nonexpert_bytes(llm) + (4 << 20) + expert_bytes(llm), kv_cache_memory=4 << 20)
    with pytest.raises(ValueError, match="cannot read a memory size"):
        LLM(tiny_moe, gpu_memory_budget="six gigs")
    assert parse_bytes("6GiB") == 6 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5G") == 3 << 29


def test_group_policy_evicts_the_group_needed_last():
    owners, layers, size = [1, 4, 7], 10, 3
    p = GroupPolicy(owners, layers, size)
    for key in [(1, 0), (1, 1), (4, 0), (7, 0), (7, 1)]:
        p.touch(key)
    p.touch((1, 0))  # hot expert of group 1
    p.on_layer(5)
    # From layer 5 (group 4 running, distance 0) the next uses are group 7 at layer 7
    # (distance 2) and group 1 at layer 1 of the next token (distance 6).
    victim = p.victim([(1, 0), (1, 1), (4, 0), (7, 0), (7, 1)])
    assert victim == (1, 1)  # furthest group, and its less used expert
    lru = LRUPolicy(owners, layers, size)
    for key in [(1, 0), (1, 1), (4, 0)]:
        lru.touch(key)
    assert lru.victim([(1, 1), (4, 0)]) == (1, 1)
