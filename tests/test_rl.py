"""RL with verifiable rewards: the objective, the advantages, engine/trainer log-probability
agreement, weight sharing and resuming (CPU, hermetic).

    PYTHONPATH=src python -m pytest tests/test_rl.py -q
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import tiny_model, tok, tok_dir  # noqa: F401  (fixtures)

from megrez.engine import Engine, SamplingParams
from megrez.eval.tasks.base import Example, Grade, Task
from megrez.loading import save_model
from megrez.train.rl import RLConfig, RLTrainer, Rollout
from megrez.train.rl_loss import gae_advantages, group_advantages, ppo_clip_loss_sum, terminal_rewards, token_logprobs

EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- objective

def test_ppo_clipped_loss_equals_hand_computation():
    # ratios 1.5, 0.9, 1.0 with A = +1; 0.5, 1.1 (and a masked token) with A = -2; eps = 0.2
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.9), 0.0], [math.log(0.5), math.log(1.1), 5.0]],
                        requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = ppo_clip_loss_sum(logp, old, adv, mask, clip_eps=0.2)
    # -min(r A, clip(r) A): -1.2 (clipped at 1.2), -0.9, -1.0, +1.6 (clipped at 0.8), +2.2
    assert loss.item() == pytest.approx(-1.2 - 0.9 - 1.0 + 1.6 + 2.2, abs=1e-6)
    assert loss.item() / int(mask.sum()) == pytest.approx(0.14, abs=1e-6)
    assert stats["clipped_tokens"] == 2
    loss.backward()
    # Clipped tokens pass no gradient; the others d/dlogp = -ratio * A.
    expected = torch.tensor([[0.0, -0.9, -1.0], [0.0, 2.2, 0.0]])
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=1e-6)


def test_advantages_are_zero_for_a_group_with_equal_rewards():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    assert torch.equal(adv[0], torch.zeros(4)) and torch.equal(adv[1], torch.zeros(4))
    std = 0.5  # unbiased std of (1, 0, 0, 0)
    torch.testing.assert_close(adv[2], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert adv[2].sum().abs() < 1e-6


def test_gae_with_lambda_and_gamma_one_gives_every_token_the_terminal_advantage():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    adv_seq = torch.tensor([0.7, -1.3])
    r = terminal_rewards(adv_seq, mask)
    assert r[0, 4] == pytest.approx(0.7) and r[1, 5] == pytest.approx(-1.3) and r.abs().sum() == pytest.approx(2.0)
    a = gae_advantages(r, torch.zeros(2, 6), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(a, adv_seq[:, None] * mask)
    # With a critic: A_t = R - V(s_t) (the telescoped sum); gamma < 1 discounts instead.
    values = torch.randn(2, 6, generator=g)
    a = gae_advantages(r, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(a, (adv_seq[:, None] - values) * mask)
    assert not torch.allclose(gae_advantages(r, torch.zeros(2, 6), mask, gamma=0.9, lam=1.0), adv_seq[:, None] * mask)


# ------------------------------------------------------------------- engine vs trainer

def test_rollout_engine_logprobs_equal_the_trainers_recomputation(tok):  # noqa: F811
    """PPO's ratio is exp(trainer - engine): it must start at 1 for the same weights."""
    model = tiny_model(tok, seed=7)
    model.train().requires_grad_(True)          # as the trainer holds it
    engine = Engine(model, tok, max_num_seqs=3, max_model_len=64)  # fewer slots than requests
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, tok.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 5, 14, 7)]
    reqs = [engine.add_request(p, SamplingParams(max_tokens=10, temperature=1.0, top_p=1.0, top_k=0,
                                                 repetition_penalty=1.0, ignore_eos=True, seed=i, logprobs=0))
            for i, p in enumerate(prompts)]
    got = {r.request_id: [] for r in reqs}
    pending = set(got)
    while pending:
        for out in engine.step():
            got[out.request_id] += [s.logprob for s in out.new_logprobs]
            if out.finished:
                pending.discard(out.request_id)
    rolls = [Rollout(0, r.prompt_ids, r.output_ids, got[r.request_id], 0.0, "") for r in reqs]
    fake = SimpleNamespace(device=torch.device("cpu"))
    inputs, targets, mask, old, _, _ = RLTrainer.batch_tensors(fake, rolls, [0.0] * len(rolls))
    trainer_lp = token_logprobs(model(inputs), targets)
    # The float64 recomputation measures the float32 rounding noise of this very computation.
    exact = token_logprobs(tiny_model(tok, seed=7).double()(inputs), targets)
    noise = (trainer_lp.double() - exact)[mask].abs().max().item()
    assert noise < 1e-4, noise  # a routing flip would show here, not as a pass
    gap = (trainer_lp - old)[mask].abs().max().item()
    tol = 4 * noise + 8 * EPS32 * old[mask].abs().max().item()
    assert int(mask.sum()) == 50 and gap <= tol, (gap, tol)


class EvenLength(Task):
    """A toy verifiable task a random model half-solves: reward 1 when the answer has an even
    number of characters."""
    name = "even-length"
    max_tokens = 6

    def __init__(self, n=12):
        self.n = n

    def examples(self):
        return [Example(f"q{i}", f"question {i}", None) for i in range(self.n)]

    def grade(self, ex, response):
        return Grade(len(response) % 2 == 0, extracted=len(response))


@pytest.fixture()
def policy_dir(tmp_path, tok, tok_dir):  # noqa: F811
    model = tiny_model(tok, seed=3)
    return save_model(model, tmp_path / "policy", dtype=torch.float32, copy_from=tok_dir)


def rl_cfg(policy_dir: Path, out: Path, **kw) -> RLConfig:
    base = dict(init=str(policy_dir), out=str(out), steps=4, prompts_per_step=4, group_size=4, filter_samples=2,
                zero_pass_fraction=None, minibatches=2, ppo_epochs=2, micro_batch_size=3, lr=1e-3, eval_every=2,
                save_every=2, max_num_seqs=5, progress=False, plots=False, eval_task_options=None)
    base.update(kw)
    return RLConfig(**base)


def test_engine_samples_with_the_policys_own_tensors(policy_dir, tmp_path):
    tr = RLTrainer(rl_cfg(policy_dir, tmp_path / "run"), task=EvenLength())
    assert tr.engine.model is tr.model and tr.rollout.shared
    before = tr.generate([0], 4, "probe", "")
    with torch.no_grad():
        tr.model.lm_head.weight.mul_(-3.0)       # an "update": the very next rollout must see it
    after = tr.generate([0], 4, "probe", "")
    assert [r.output_ids for r in before] != [r.output_ids for r in after]


def test_rl_resume_after_interruption_continues_identically(policy_dir, tmp_path):
    straight = RLTrainer(rl_cfg(policy_dir, tmp_path / "a"), task=EvenLength()).run()
    cfg = rl_cfg(policy_dir, tmp_path / "b", stop_after=3)   # "killed" after step 3, saved at step 2
    first = RLTrainer(cfg, task=EvenLength()).run()
    assert first["stopped"] and first["rewards"] == straight["rewards"][:3]
    cfg.stop_after = None
    resumed = RLTrainer(cfg, task=EvenLength()).run()
    assert resumed["rewards"] == straight["rewards"][2:] and resumed["losses"] == straight["losses"][2:]
    assert any(x != 0 for x in straight["losses"]), "the toy task gave no learning signal"

    def records(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    strip = ("rollout_seconds", "train_seconds")
    a = [{k: v for k, v in r.items() if k not in strip} for r in records(tmp_path / "a")]
    b = [{k: v for k, v in r.items() if k not in strip} for r in records(tmp_path / "b")]
    assert a == b
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a/final/model.safetensors")), load_file(str(tmp_path / "b/final/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Mixed(EvenLength):
    """Prompts 0-3 are always solved, 4-11 never, the rest sometimes (even-length answers)."""

    def __init__(self):
        super().__init__(n=16)

    def grade(self, ex, response):
        i = int(ex.id[1:])
        return Grade(True if i < 4 else False if i < 12 else len(response) % 2 == 0)


def test_prompt_filtering_by_pass_rate(policy_dir, tmp_path):
    tr = RLTrainer(rl_cfg(policy_dir, tmp_path / "run", filter_samples=6, zero_pass_fraction=0.5), task=Mixed())
    tr.out.mkdir(parents=True)
    pool = tr.build_pool()
    event = json.loads((tr.out / "metrics.jsonl").read_text().splitlines()[-1])
    partial = [i for i in pool if i >= 12]
    never = [i for i in pool if 4 <= i < 12]
    assert not any(i < 4 for i in pool) and event["always_solved"] >= 4      # solved every time: dropped
    assert len(partial) == event["partly_solved"] >= 1                       # sometimes solved: all kept
    assert len(never) == min(8, len(partial)) == event["kept_never_solved"]  # half the pool never solved
