"""Requests that finish on their first sampled token leave the engine at once.

    PYTHONPATH=src python -m pytest -q tests/test_engine_first_token_finish.py
"""
import pytest

from megrez.engine import Engine, SamplingParams
from megrez.loading import load_model
from megrez.tiny import create_tiny
from megrez.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = create_tiny(tmp_path_factory.mktemp("engine") / "tiny-dense", arch="dense")
    return Engine(load_model(path, device="cpu"), Tokenizer(path), max_num_seqs=2, max_model_len=128)


def _drain(engine):
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs


def test_max_tokens_one_does_not_enter_the_decode_batch(engine):
    short = engine.add_request([5, 6, 7], SamplingParams(max_tokens=1, seed=0))
    long = engine.add_request([5, 6, 8], SamplingParams(max_tokens=4, seed=0, ignore_eos=True))
    engine.step()
    assert short.finish_reason == "length" and not short.block_table
    assert engine.running == [long]
    assert engine.blocks.num_used == len(long.block_table) == 1
    _drain(engine)
    assert len(long.output_ids) == 4 and engine.blocks.num_used == 0 and not engine.running


def test_stop_token_as_first_token_frees_the_slot(engine):
    probe = engine.add_request([9, 10, 11], SamplingParams(max_tokens=1, temperature=0))
    _drain(engine)
    first = probe.output_ids[0]
    req = engine.add_request([9, 10, 11], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[first]))
    other = engine.add_request([12, 13], SamplingParams(max_tokens=3, seed=1, ignore_eos=True))
    _drain(engine)
    assert req.finish_reason == "stop" and req.output_ids == [first]
    assert len(other.output_ids) == 3 and engine.blocks.num_used == 0
