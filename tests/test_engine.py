"""The engine against the model's own no-cache forward, and its request handling."""
import pytest
import torch

from megrez import LLM, SamplingParams
from megrez.engine import Engine, QueueFull

PROMPTS = [[5, 77, 300, 12, 640, 9, 81], [433, 2, 150], [700, 61, 18, 290, 404], [9] * 40]


@pytest.fixture(scope="module")
def llm(tiny_moe):
    return LLM(tiny_moe, device="cpu", dtype="float32", max_num_seqs=4)


def naive_greedy(model, ids, n):
    """Recompute the whole sequence for every token: no cache, no batching."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_engine_matches_naive_generation(llm):
    for p in PROMPTS[:2]:
        assert llm.generate(p, greedy(20)).token_ids == naive_greedy(llm.model, p, 20)


def test_batched_generation_equals_one_by_one(llm):
    params = [greedy(16), SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.2, top_k=20, seed=1, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=3, max_tokens=12, ignore_eos=True)]
    alone = [llm.generate(p, sp).token_ids for p, sp in zip(PROMPTS, params)]
    together = [c.token_ids for c in llm.generate(PROMPTS, params)]
    assert together == alone
    assert [len(t) for t in together] == [16, 16, 9, 12]


def test_more_requests_than_slots_queue_and_finish(llm):
    prompts = [[i + 3, i + 40, i + 9] for i in range(10)]  # 10 requests, 4 sequences at once
    outs = llm.generate(prompts, greedy(6))
    assert [o.token_ids for o in outs] == [llm.generate(p, greedy(6)).token_ids for p in prompts]
    assert llm.engine.blocks.num_used == 0


def test_seed_reproducible_and_distinct(llm):
    sp = lambda s: SamplingParams(temperature=1.0, seed=s, max_tokens=24, ignore_eos=True)  # noqa: E731
    a, b, c = (llm.generate(PROMPTS[0], sp(s)).token_ids for s in (11, 11, 12))
    assert a == b
    assert a != c


def test_chunked_prefill_matches_single_pass(tiny_moe, llm):
    engine = Engine(llm.model, llm.tokenizer, max_num_seqs=2, prefill_chunk=7)
    req = engine.add_request(PROMPTS[3], greedy(8))
    engine.run_to_completion([req])
    assert req.output_ids == llm.generate(PROMPTS[3], greedy(8)).token_ids


def test_stop_token_and_strings(llm):
    base = llm.generate(PROMPTS[0], greedy(20))
    stop_tok = base.token_ids[5]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok]))
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:base.token_ids.index(stop_tok) + 1]
    text = base.text
    needle = text[len(text) // 2: len(text) // 2 + 3]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, stop=[needle], ignore_eos=True))
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(needle)]
    streamed = "".join(llm.stream(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, stop=[needle],
                                                             ignore_eos=True)))
    assert streamed == out.text


def test_eos_stops_generation_unless_ignored(llm, monkeypatch):
    base = llm.generate(PROMPTS[1], greedy(8))
    eos = base.token_ids[3]
    # Pretend the model's 4th greedy token is the checkpoint's end-of-turn token.
    monkeypatch.setattr(llm.engine, "stop_token_ids", frozenset({eos}))
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8))
    cut = base.token_ids.index(eos)
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:cut + 1]
    assert out.text == llm.tokenizer.decode(base.token_ids[:cut])
    assert llm.generate(PROMPTS[1], greedy(8)).token_ids == base.token_ids


def test_turn_end_is_a_stop_token(llm):
    assert llm.tokenizer.token_to_id("<|turn_end|>") in llm.tokenizer.stop_token_ids


def test_length_limits(llm):
    out = llm.generate(PROMPTS[0], greedy(5))
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    small = Engine(llm.model, llm.tokenizer, max_num_seqs=1, max_model_len=12)
    req = small.add_request(PROMPTS[0], greedy(100))
    small.run_to_completion([req])
    assert req.finish_reason == "length" and len(PROMPTS[0]) + len(req.output_ids) == 12
    with pytest.raises(ValueError, match="prompt has 40 tokens but the context holds 12.*29 tokens too many"):
        small.add_request(PROMPTS[3], greedy(1))


def test_abort_frees_the_slot(llm):
    engine = llm.engine
    stream = llm.stream(PROMPTS[0], greedy(50))
    next(stream)
    assert len(engine.running) == 1
    stream.close()
    assert not engine.running and engine.blocks.num_used == 0


def test_queue_bound_and_bad_requests(llm):
    engine = Engine(llm.model, llm.tokenizer, max_num_seqs=1, max_waiting=2)
    engine.add_request([1, 2], greedy(1))
    engine.add_request([1, 2], greedy(1))
    with pytest.raises(QueueFull):
        engine.add_request([1, 2], greedy(1))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([], greedy(1))
    with pytest.raises(ValueError, match="token ids must be integers in"):
        engine.add_request([10 ** 9], greedy(1))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request([1], SamplingParams(top_p=0))


def test_kv_budget_sizes_the_block_pool(llm):
    per_token = 2 * llm.model.args.num_hidden_layers * llm.model.args.num_key_value_heads * llm.model.args.head_dim * 4
    engine = Engine(llm.model, llm.tokenizer, max_num_seqs=16, max_model_len=100, kv_cache_memory=per_token * 250,
                    block_size=10)
    assert engine.blocks.usable == 24  # 25 blocks of 10 tokens, less the null block
    # Short sequences share the memory: far more than 250 // 100 of them run at once.
    reqs = [engine.add_request([i + 1, i + 2], greedy(3)) for i in range(12)]
    engine.step()
    assert len(engine.running) == 12 and engine.blocks.num_used == 12
    engine.run_to_completion(reqs)
    assert engine.blocks.num_used == 0
    with pytest.raises(ValueError, match="KV cache budget"):
        Engine(llm.model, llm.tokenizer, max_model_len=100, kv_cache_memory=per_token * 50)
    # Without a budget of its own, the pool holds max_num_seqs full-length sequences.
    assert Engine(llm.model, None, max_num_seqs=3, max_model_len=64, block_size=16).blocks.usable == 12


def test_defaults_come_from_generation_config(llm):
    filled = SamplingParams().with_defaults(llm.tokenizer.generation_config)
    assert (filled.temperature, filled.top_p, filled.max_tokens) == (0.7, 0.9, 256)
    assert SamplingParams().with_defaults({"do_sample": False}).temperature == 0.0
    # No max_new_tokens anywhere: until a stop, or the context is full.
    assert SamplingParams().with_defaults({}).max_tokens is None
    engine = Engine(llm.model, None, max_num_seqs=1, max_model_len=24)
    req = engine.add_request(PROMPTS[0], SamplingParams(temperature=0))
    engine.run_to_completion([req])
    assert req.finish_reason == "length" and len(PROMPTS[0]) + len(req.output_ids) == 24
