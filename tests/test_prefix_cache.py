"""Paged KV cache and automatic prefix caching: cached generation equals recomputation,
blocks are shared read-only and returned when unused, preemption is invisible.

    PYTHONPATH=src python -m pytest -q tests/test_prefix_cache.py
"""
import pytest
import torch

from megrez.engine import Engine, SamplingParams
from megrez.loading import load_model
from megrez.models.cache import NULL_BLOCK
from megrez.tokenizer import Tokenizer

BLOCK = 4
SYSTEM = [(7 * i + 3) % 500 + 10 for i in range(23)]  # a shared prefix of 5 full blocks and a bit


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_moe):
    return load_model(tiny_moe, device="cpu", dtype="float32"), Tokenizer(tiny_moe)


def make_engine(model_and_tokenizer, caching=True, **kw):
    model, tok = model_and_tokenizer
    kw = {"max_num_seqs": 8, "max_model_len": 128, "block_size": BLOCK, **kw}
    return Engine(model, tok, enable_prefix_caching=caching, **kw)


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def seeded(n, seed):
    return SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_tokens=n, ignore_eos=True)


def run(engine, prompts, params):
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.run_to_completion(reqs)
    return [r.output_ids for r in reqs]


def no_writes_into_published_blocks(engine):
    """Wraps the cache so that any write into a block published to the prefix cache fails."""
    real_view = engine.cache.view

    def checked(starts, num_new, tables, valid=None):
        view = real_view(starts, num_new, tables, valid)
        for b, block in enumerate((view._slots // BLOCK).tolist()):
            assert block == NULL_BLOCK or not engine.blocks.is_cached(block), \
                f"write {b} of this pass lands in published block {block}"
        return view

    engine.cache.view = checked


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_cached_generation_equals_uncached(model_and_tokenizer, sampling):
    prompts = [SYSTEM + [100 + i, 200 + i, 300 + i] for i in range(3)]
    params = [greedy(10) if sampling == "greedy" else seeded(10, 40 + i) for i in range(3)]
    cold = make_engine(model_and_tokenizer, caching=False)
    hot = make_engine(model_and_tokenizer)
    no_writes_into_published_blocks(hot)
    reference = run(cold, prompts, params)
    # One after another: the 2nd and 3rd find the system prompt's blocks.
    cached = [run(hot, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert cached == reference
    shared = (len(SYSTEM) // BLOCK) * BLOCK
    assert hot.stats["cached_prompt_tokens"] == 2 * shared
    assert hot.stats["prefill_tokens"] == sum(map(len, prompts)) - 2 * shared
    assert cold.stats["cached_prompt_tokens"] == 0


def test_multi_turn_reuses_the_previous_answer(model_and_tokenizer):
    """Turn 2's prompt is turn 1's prompt + answer + a new message: everything but the new
    part (and the partial last block) comes from the cache, and the answer is unchanged."""
    hot, cold = make_engine(model_and_tokenizer), make_engine(model_and_tokenizer, caching=False)
    turn1 = SYSTEM + [41, 42, 43]
    answer = run(hot, [turn1], [greedy(12)])[0]
    turn2 = turn1 + answer + [51, 52, 53, 54, 55]
    before = hot.stats["cached_prompt_tokens"]
    assert run(hot, [turn2], [greedy(8)]) == run(cold, [turn2], [greedy(8)])
    # The last answer token's keys were never computed (it was sampled, not fed).
    computed_before = len(turn1) + len(answer) - 1
    assert hot.stats["cached_prompt_tokens"] - before == (computed_before // BLOCK) * BLOCK


def test_n_choices_prefill_the_prompt_once(model_and_tokenizer):
    hot, cold = make_engine(model_and_tokenizer), make_engine(model_and_tokenizer, caching=False)
    prompt = SYSTEM + [9, 8, 7]
    params = [seeded(6, 10 + i) for i in range(4)]
    assert run(hot, [prompt] * 4, params) == run(cold, [prompt] * 4, params)
    full = ((len(prompt) - 1) // BLOCK) * BLOCK
    assert hot.stats["cached_prompt_tokens"] == 3 * full
    assert hot.stats["prefill_tokens"] == len(prompt) + 3 * (len(prompt) - full)


def test_blocks_are_returned_and_evicted_when_unused(model_and_tokenizer):
    # 13 usable blocks: room for the running sequences, not for every finished prefix.
    hot = make_engine(model_and_tokenizer, max_num_seqs=2, max_model_len=48)
    hot.blocks = type(hot.blocks)(14, BLOCK)
    cold = make_engine(model_and_tokenizer, caching=False, max_num_seqs=2, max_model_len=48)
    no_writes_into_published_blocks(hot)
    prompts = [[(i * 31 + j * 7) % 700 + 5 for j in range(17)] for i in range(6)]
    assert run(hot, prompts, [greedy(6)] * 6) == run(cold, prompts, [greedy(6)] * 6)
    assert hot.blocks.num_used == 0 and not hot.running
    assert hot.blocks.num_cached > 0  # finished prefixes stay for later hits...
    assert hot.blocks.stats["evicted_blocks"] > 0  # ...until the pool needs their blocks
    assert hot.blocks.num_free == hot.blocks.usable
    # The most recent prompt is still cached and is hit again.
    before = hot.stats["cached_prompt_tokens"]
    assert run(hot, [prompts[-1]], [greedy(6)]) == run(cold, [prompts[-1]], [greedy(6)])
    assert hot.stats["cached_prompt_tokens"] - before == 16


def test_shared_blocks_keep_their_content_while_others_run(model_and_tokenizer):
    hot = make_engine(model_and_tokenizer)
    no_writes_into_published_blocks(hot)
    first = hot.add_request(SYSTEM + [1, 2, 3], greedy(20))
    hot.step()  # prefilled: the system prompt's blocks are published, and held by `first`
    shared = first.block_table[: len(SYSTEM) // BLOCK]
    assert all(hot.blocks.is_cached(b) for b in shared)
    snapshot = [(k[:, shared].clone(), v[:, shared].clone()) for k, v in zip(hot.cache.k, hot.cache.v)]
    others = [hot.add_request(SYSTEM + [4 + i], seeded(15, i)) for i in range(4)]
    others += [hot.add_request([600 + i] * 9, greedy(15)) for i in range(3)]
    hot.run_to_completion([first] + others)
    assert all(r.block_table == [] for r in [first] + others)
    for (k0, v0), k, v in zip(snapshot, hot.cache.k, hot.cache.v):
        assert torch.equal(k[:, shared], k0) and torch.equal(v[:, shared], v0)
    assert hot.stats["cached_prompt_tokens"] >= 4 * len(shared) * BLOCK


def test_preemption_when_the_pool_runs_dry_is_invisible(model_and_tokenizer):
    kw = {"max_num_seqs": 4, "max_model_len": 40}
    tight = make_engine(model_and_tokenizer, **kw)
    tight.blocks = type(tight.blocks)(12, BLOCK)  # 11 blocks for 4 sequences growing to 30 tokens
    roomy = make_engine(model_and_tokenizer, caching=False, **kw)
    prompts = [[(i * 13 + j) % 600 + 20 for j in range(6)] for i in range(4)]
    params = [seeded(24, i) for i in range(4)]
    assert run(tight, prompts, params) == run(roomy, prompts, params)
    assert tight.stats["preemptions"] > 0
    assert tight.blocks.num_used == 0


def test_cache_salt_keeps_prefixes_apart(model_and_tokenizer):
    hot = make_engine(model_and_tokenizer)
    prompt = SYSTEM + [5]
    hot.run_to_completion([hot.add_request(prompt, greedy(2), cache_salt="image-a")])
    hot.run_to_completion([hot.add_request(prompt, greedy(2), cache_salt="image-b")])
    assert hot.stats["cached_prompt_tokens"] == 0
    hot.run_to_completion([hot.add_request(prompt, greedy(2), cache_salt="image-a")])
    assert hot.stats["cached_prompt_tokens"] == (len(SYSTEM) // BLOCK) * BLOCK


def test_prompt_logprobs_equal_a_plain_forward(model_and_tokenizer):
    model, _ = model_and_tokenizer
    engine = make_engine(model_and_tokenizer, prefill_chunk=5)  # several passes per prompt
    prompt = SYSTEM + [77, 78]
    engine.run_to_completion([engine.add_request(prompt, greedy(3))])  # its blocks are now cached
    req = engine.add_request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
    outs = []
    while engine.has_work():
        outs += engine.step()
    (out,) = [o for o in outs if o.request_id == req.request_id]
    assert out.finished and out.finish_reason == "length" and out.completion_tokens == 0
    assert out.new_token_ids == [] and len(out.prompt_logprobs) == len(prompt)
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry.token == prompt[i]
        # Cached vs plain attention differ only in summation order over at most len(prompt) keys.
        assert entry.logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert [t for t, _ in entry.top_logprobs] == ref[i - 1].topk(2).indices.tolist()
    assert engine.blocks.num_used == 0


def test_changed_weights_invalidate_the_cache(tiny_moe):
    """A trainer that updates the weights in place (RL rollouts between optimizer steps) must
    not be served keys and values computed with the old ones."""
    model = load_model(tiny_moe, device="cpu", dtype="float32")
    tok = Tokenizer(tiny_moe)
    hot = Engine(model, tok, max_num_seqs=4, max_model_len=128, block_size=BLOCK)
    prompt = SYSTEM + [3, 1, 4]
    before = run(hot, [prompt], [greedy(8)])
    with torch.no_grad():
        for p in model.layers[0].self_attn.parameters():
            p.mul_(1.5)  # in place, as an optimizer step or copy_ does
    hits = hot.stats["cached_prompt_tokens"]
    after = run(hot, [prompt], [greedy(8)])
    assert hot.stats["cached_prompt_tokens"] == hits  # nothing reused across the change
    fresh = Engine(model, tok, max_num_seqs=4, max_model_len=128, block_size=BLOCK, enable_prefix_caching=False)
    assert after == run(fresh, [prompt], [greedy(8)])
    assert after != before  # the change mattered, so a stale cache would have been caught
    run(hot, [prompt], [greedy(8)])
    assert hot.stats["cached_prompt_tokens"] > hits  # and caching resumes with the new weights
