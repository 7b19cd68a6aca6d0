"""One request never hurts another: sampling extremes are exact limits, and a failure in one
request's sampling, stop handling or detokenisation ends that request alone.

    PYTHONPATH=src python -m pytest -q tests/test_engine_isolation.py
"""
from types import SimpleNamespace

import pytest
import torch

from megrez.engine import Engine, SamplingParams
from megrez.engine.sampling import make_generator, sample_row
from megrez.loading import load_model
from megrez.tokenizer import Tokenizer


def row_request(params: SamplingParams, history=(), seed=0):
    params = params.with_defaults({})
    return SimpleNamespace(params=params, generator=make_generator(seed, torch.device("cpu")),
                           history_ids=list(history), output_ids=[])


LOGITS = torch.tensor([1.0, 3.0, -2.0, 2.5, 0.5])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-40), SamplingParams(temperature=5e-324),
    SamplingParams(temperature=1.0, top_p=1e-46), SamplingParams(temperature=2.0, top_p=5e-324),
    SamplingParams(temperature=1e-30, top_p=1e-30, top_k=2),
], ids=["temp-1e-40", "temp-min-subnormal", "top-p-1e-46", "top-p-min-subnormal", "all-tiny"])
def test_vanishing_temperature_or_top_p_is_greedy(params):
    for seed in range(5):
        assert sample_row(LOGITS, row_request(params, seed=seed)).token == 1


def test_vanishing_temperature_splits_exact_ties():
    tied = torch.tensor([0.0, 2.0, 2.0, -1.0])
    seen = {sample_row(tied, row_request(SamplingParams(temperature=1e-40), seed=s)).token for s in range(40)}
    assert seen == {1, 2}


def test_vanishing_repetition_penalty_is_its_limit():
    # Seen tokens 0 and 3 have positive logits: divided by 1e-39 (or less) they overflow, and
    # the larger of them (3: logit 2.5) takes all the mass, even above the unseen token 1.
    for rp in (1e-39, 1e-300, 5e-324):
        for temperature in (0.0, 0.7, 1e-40):
            p = SamplingParams(repetition_penalty=rp, temperature=temperature)
            for seed in range(3):
                assert sample_row(LOGITS, row_request(p, history=[0, 3, 2], seed=seed)).token == 3
    # Only negative logits seen: they move to ~0, which the positive unseen logits still beat.
    p = SamplingParams(repetition_penalty=1e-39, temperature=0)
    assert sample_row(LOGITS, row_request(p, history=[2])).token == 1


def test_logit_bias_forces_and_bans_tokens():
    assert sample_row(LOGITS, row_request(SamplingParams(temperature=0, logit_bias={2: 100.0}))).token == 2
    assert sample_row(LOGITS, row_request(SamplingParams(temperature=0, logit_bias={1: -100.0}))).token == 3
    for seed in range(5):
        p = SamplingParams(temperature=1.0, logit_bias={4: 100.0})
        assert sample_row(LOGITS, row_request(p, seed=seed)).token == 4


def test_sampling_params_bounds_name_the_field():
    for kw, field in (({"logit_bias": {1: 101.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
                      ({"max_tokens": -1}, "max_tokens"), ({"prompt_logprobs": -2}, "prompt_logprobs")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw).validate()


# ------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def engine(tiny_moe):
    return Engine(load_model(tiny_moe, device="cpu", dtype="float32"), Tokenizer(tiny_moe), max_num_seqs=8,
                  max_model_len=128)


def finish(engine, reqs):
    outs = {r.request_id: [] for r in reqs}
    while any(r.finish_reason is None for r in reqs):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


NORMAL = [([5, 77, 300, 12], SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)),
          ([433, 2, 150], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]


def solo(engine, prompt, params):
    req = engine.add_request(prompt, params)
    finish(engine, [req])
    return req.output_ids


def test_extremes_in_a_batch_leave_the_others_alone(engine):
    alone = [solo(engine, p, sp) for p, sp in NORMAL]
    greedy = solo(engine, [9, 9, 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    extremes = [SamplingParams(temperature=1e-40, max_tokens=6, ignore_eos=True, seed=1),
                SamplingParams(temperature=1.0, top_p=1e-46, max_tokens=6, ignore_eos=True, seed=2),
                SamplingParams(temperature=0.5, repetition_penalty=1e-39, max_tokens=6, ignore_eos=True, seed=3),
                SamplingParams(temperature=2.0, repetition_penalty=1e-39, presence_penalty=2, frequency_penalty=-2,
                               top_k=1, max_tokens=6, ignore_eos=True, seed=4)]
    reqs = [engine.add_request(p, sp) for p, sp in NORMAL] + [engine.add_request([9, 9, 9], sp) for sp in extremes]
    finish(engine, reqs)
    assert [r.output_ids for r in reqs[:2]] == alone
    assert all(r.finish_reason == "length" and len(r.output_ids) == 6 for r in reqs[2:])
    assert reqs[2].output_ids == greedy and reqs[3].output_ids == greedy
    # The limit of a vanishing repetition penalty: once a token repeats, it repeats for good.
    assert len(set(reqs[4].output_ids[1:])) <= 2


@pytest.mark.parametrize("where", ["detokenizer", "sampling", "stop"])
def test_a_failing_request_ends_alone(engine, monkeypatch, where):
    alone = [solo(engine, p, sp) for p, sp in NORMAL]
    victim_params = SamplingParams(temperature=0.7, seed=99, max_tokens=12, ignore_eos=True, stop=["never"])
    reqs = [engine.add_request(p, sp) for p, sp in NORMAL]
    victim = engine.add_request([1, 2, 3], victim_params)

    class Boom(RuntimeError):
        pass

    if where == "detokenizer":
        calls = {"n": 0}

        def add(token):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Boom("cannot decode")
            return "x"
        victim.detokenizer = SimpleNamespace(add=add, flush=lambda: "")
    elif where == "sampling":
        import megrez.engine.engine as eng
        real = eng.sample_row

        def sample(logits, r, logprobs=None):
            if r is victim and len(r.output_ids) == 2:
                raise Boom("probability tensor contains either inf, nan or element < 0")
            return real(logits, r, logprobs)
        monkeypatch.setattr(eng, "sample_row", sample)
    else:
        class BadStops(list):
            def __iter__(self):
                if len(victim.output_ids) >= 4:
                    raise Boom("stop matcher broke")
                return super().__iter__()
        victim.params.stop = BadStops(["never"])
    outs = finish(engine, reqs + [victim])
    assert [r.output_ids for r in reqs] == alone
    assert all(r.finish_reason == "length" for r in reqs)
    last = outs[victim.request_id][-1]
    assert last.finished and last.finish_reason == "error" and "Boom" in last.error
    assert victim.request_id not in engine.requests and not victim.block_table
    assert engine.stats["requests_failed"] >= 1 and engine.blocks.num_used == 0
    assert solo(engine, *NORMAL[1]) == alone[1]  # and the engine serves on
