"""Training pipeline tests (CPU, hermetic, well under a minute on 2 cores).

    PYTHONPATH=src python -m pytest tests/test_train*.py -q
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import timing
import torch

from megrez.models import build_model
from megrez.models.base import PackedContext
from megrez.models.moe import Router, RoutingConfig, route
from megrez.presets import preset_config
from megrez.tiny import TOKENIZER_CORPUS, tokenizer_files, train_tokenizer
from megrez.tokenizer import Tokenizer
from megrez.train import checkpoint as ckpt
from megrez.train.attention import FlexPackedContext, document_positions
from megrez.train.balance import ExpertLoad, imbalance, sequence_aux_loss
from megrez.train.data import (
    NO_TURN,
    Batch,
    DataError,
    Loader,
    PretrainSource,
    pack_examples,
    pack_stream,
    read_conversations,
    read_documents,
    render_conversation,
)
from megrez.train.loss import loss_count, per_token_sum, token_losses, turn_sum
from megrez.train.optim import lr_at
from megrez.train.trainer import TrainConfig, Trainer, enable_activation_checkpointing

WORDS = ("the lord said unto moses and aaron light water earth heaven day night king people land "
         "river mountain bread wine shepherd sheep field city gate house").split()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(TOKENIZER_CORPUS.splitlines() + [" ".join(WORDS)], 512)
    for name, content in tokenizer_files(tok, 1024).items():
        (path / name).write_text(content, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer(tok_dir)


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        docs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) + ".")
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_chat(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": "Add."}]
            for _ in range(rng.randint(1, 3)):
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                msgs += [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def tiny_model(tok: Tokenizer, seed: int = 0, **overrides):
    cfg = preset_config("megrez2-test", tok.vocab_size, overrides)
    model = build_model(cfg)
    model.init_weights(0.02, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # routers that differ between tokens, so routing matters
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    model.hf_config = cfg
    return model


def pretrain_cfg(tmp: Path, tok_dir: Path, **kw) -> TrainConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    base = dict(stage="pretrain", preset="megrez2-test", tokenizer=str(tok_dir), data=[str(write_corpus(tmp / "c.txt"))],
                val_fraction=0.1, out=str(tmp / "run"), seq_len=32, batch_size=2, steps=6, lr=3e-3, warmup_steps=2,
                log_every=1, eval_every=3, eval_batches=2, save_every=2, progress=False, plots=False)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------- packing

def test_packed_logits_do_not_depend_on_neighbours(tok):
    model = tiny_model(tok).eval()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, tok.vocab_size, (n,), generator=g) for n in (9, 7, 12))
    alone = model(a[None])[0]
    row = torch.cat([b, a, c])[None]
    docs = torch.tensor([0] * 7 + [1] * 9 + [2] * 12)[None]
    ctx = PackedContext(docs)
    assert ctx.positions[0].tolist() == list(range(7)) + list(range(9)) + list(range(12))
    packed = model(row, cache=ctx)[0]
    torch.testing.assert_close(packed[7:16], alone, atol=2e-5, rtol=1e-5)
    # The same document placed first in another row gives the same logits too.
    row2 = torch.cat([a, c[:4]])[None]
    packed2 = model(row2, cache=PackedContext(torch.tensor([5] * 9 + [6] * 4)[None]))[0]
    torch.testing.assert_close(packed2[:9], alone, atol=2e-5, rtol=1e-5)


def test_flex_attention_path_matches_dense_mask():
    g = torch.Generator().manual_seed(0)
    docs = torch.tensor([[0] * 5 + [1] * 20 + [2] * 7, [3] * 32])
    q = torch.randn(2, 4, 32, 16, generator=g)
    k, v = torch.randn(2, 2, 32, 16, generator=g), torch.randn(2, 2, 32, 16, generator=g)
    dense, flex = PackedContext(docs), FlexPackedContext(docs, compiled=False)
    assert torch.equal(flex.positions, dense.positions)
    assert torch.equal(document_positions(docs), dense.positions)
    torch.testing.assert_close(flex.attend(0, q, k, v), dense.attend(0, q, k, v), atol=1e-5, rtol=1e-5)


def test_pack_stream_rows_and_boundary_mask():
    docs = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 0]]
    rows = pack_stream(docs, seq_len=4)
    assert rows.tokens.tolist() == [[1, 2, 3, 0, 4], [4, 5, 0, 6, 7], [7, 8, 9, 0, 0]][:len(rows)]
    batch = Batch.from_rows(rows, slice(0, 2))
    assert batch.inputs[0].tolist() == [1, 2, 3, 0] and batch.targets[0].tolist() == [2, 3, 0, 4]
    # "0 -> 4" crosses from document 0 to document 1: not learned.
    assert batch.loss_mask[0].tolist() == [True, True, True, False]
    assert batch.loss_mask[1].tolist() == [True, True, False, True]


def test_loader_position_resumes_exactly(tmp_path, tok):
    src = PretrainSource([list(range(i, i + 20)) for i in range(30)], seq_len=8, seed=3)
    a = Loader(src, batch_size=3)
    seen = [a.next_batch().inputs for _ in range(40)]  # crosses several epochs
    b = Loader(src, batch_size=3)
    for _ in range(17):
        b.next_batch()
    c = Loader(src, batch_size=3)
    c.load_state_dict(b.state_dict())
    for t in seen[17:]:
        assert torch.equal(c.next_batch().inputs, t)


# ------------------------------------------------------------------------------------- SFT

def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "And 4 + 4?"},
            {"role": "assistant", "content": "4 + 4 = 8."}, {"role": "user", "content": "thanks"}]
    ids, mask, turns = render_conversation(tok, msgs)
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    learned = {}
    for i, m, t in zip(ids, mask, turns):
        assert (m == 1) == (t != NO_TURN)
        if m:
            learned.setdefault(t, []).append(i)
    assert [tok.decode(v, skip_special_tokens=False) for v in learned.values()] == \
        ["2 + 3 = 5.<|turn_end|>", "4 + 4 = 8.<|turn_end|>"]
    # The prompt before each answer is tokenised exactly as the engine tokenises it.
    first = mask.index(1)
    assert ids[:first] == tok.encode_chat(msgs[:2], add_generation_prompt=True)
    # After packing, learned targets are exactly those tokens.
    rows = pack_examples([(ids, mask, turns)] * 2, seq_len=len(ids) * 2 + 3, pad_id=0)
    batch = Batch.from_rows(rows, slice(0, 1))
    assert int(batch.loss_mask.sum()) == 2 * sum(mask)
    assert batch.targets[batch.loss_mask].tolist() == [i for i, m in zip(ids, mask) if m] * 2
    assert loss_count(batch, "turn") == 4


def test_turn_level_loss_matches_hand_computation():
    losses = torch.tensor([[1.0, 2.0, 3.0, 9.0, 4.0], [5.0, 7.0, 9.0, 9.0, 9.0]])
    turns = torch.tensor([[0, 0, 0, -1, 1], [0, 0, -1, -1, -1]])
    s, n = turn_sum(losses, turns)
    assert n == 3 and s.item() == pytest.approx(2.0 + 4.0 + 6.0)  # turn means 2, 4 and 6 -> loss 4
    s, n = per_token_sum(losses, turns >= 0)
    assert n == 6 and s.item() / n == pytest.approx((1 + 2 + 3 + 4 + 5 + 7) / 6)


def test_turn_loss_on_a_packed_batch_equals_per_turn_average(tok, tmp_path):
    convs = read_conversations([write_chat(tmp_path / "chat.jsonl", 6)])
    examples = [render_conversation(tok, m, w) for w, m in convs]
    batch = Batch.from_rows(pack_examples(examples, 96, pad_id=0), slice(0, 2))
    assert loss_count(batch, "turn") >= 4
    logits = torch.randn(*batch.inputs.shape, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    losses = token_losses(logits, batch.targets)
    means = []
    for r in range(batch.inputs.shape[0]):
        for t in sorted(set(batch.turn_ids[r].tolist()) - {NO_TURN}):
            means.append(losses[r][batch.turn_ids[r] == t].mean().item())
    s, n = turn_sum(losses, batch.turn_ids)
    assert n == len(means) == loss_count(batch, "turn")
    assert s.item() / n == pytest.approx(sum(means) / len(means), rel=1e-6)


def test_bad_data_errors_name_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a string field 'text'"):
        read_documents([bad])
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: not valid JSON"):
        read_conversations([chat])
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    (where, msgs), = read_conversations([chat])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: no assistant message"):
        render_conversation(tok, msgs, where)


# ------------------------------------------------------------------------------------- MoE

class ToyRouterModel(torch.nn.Module):
    """One MoE layer's router with the attributes ExpertLoad reads from a Megrez2 model."""

    def __init__(self, hidden: int, experts: int, top_k: int):
        super().__init__()
        layer = torch.nn.Module()
        layer.mlp = torch.nn.Module()
        layer.mlp.gate = Router(hidden, experts)
        self.layers = torch.nn.ModuleList([layer])
        self.args = SimpleNamespace(num_hidden_layers=1, n_routed_experts=experts, num_experts_per_tok=top_k,
                                    scoring_func="sigmoid", is_moe=lambda i: True)
        self.routing_hooks = []

    def route(self, x):
        gate = self.layers[0].mlp.gate
        weights, idx = route(gate(x), gate.e_score_correction_bias, RoutingConfig(self.args.num_experts_per_tok))
        for hook in self.routing_hooks:
            hook(0, idx, weights)
        return weights, idx


def test_bias_balancing_reduces_imbalance_on_a_skewed_toy_router():
    g = torch.Generator().manual_seed(0)
    model = ToyRouterModel(hidden=16, experts=8, top_k=2)
    with torch.no_grad():
        gate = model.layers[0].mlp.gate
        gate.weight.normal_(0, 0.1, generator=g)
        gate.weight[:2] += 0.2          # experts 0 and 1 win for almost every token
    x = torch.randn(512, 16, generator=g) + 1.0
    tracker = ExpertLoad(model)
    tracker.active = True
    model.route(x)
    before = imbalance(tracker.step_counts).item()
    weights_before = model.route(x)[0]
    tracker.step_counts.zero_()
    history = []
    for _ in range(100):
        model.route(x)
        history.append(imbalance(tracker.step_counts).item())
        tracker.update_biases(model, rate=0.01)
    assert before > 3.5 and max(history[-10:]) < 1.5, (before, history[-10:])
    # The bias moved selection only: routing weights are still the unbiased scores.
    bias = gate.e_score_correction_bias
    assert bias[:2].max() < 0 < bias[2:].max() and not bias.requires_grad
    w, idx = model.route(x)
    scores = gate(x).sigmoid().gather(1, idx)
    torch.testing.assert_close(w, scores / scores.sum(-1, keepdim=True))
    assert not torch.equal(weights_before, w)


def test_sequence_aux_loss_value_and_gradient():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]], requires_grad=True)
    idx = torch.tensor([[0], [1]])
    loss = sequence_aux_loss(logits, idx, (1, 2), num_experts=4, top_k=1)
    s = logits.detach().sigmoid()
    p = (s / s.sum(-1, keepdim=True)).mean(0)
    f = torch.tensor([2.0, 2.0, 0.0, 0.0])  # E/(k*T) * count = 4/2 * 1
    assert loss.item() == pytest.approx((f * p).sum().item(), rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_trainer_adds_the_sequence_aux_loss_when_asked(tmp_path, tok_dir):
    params = []
    for alpha in (0.0, 0.5):
        tr = Trainer(pretrain_cfg(tmp_path / f"aux{alpha}", tok_dir, aux_loss_weight=alpha, steps=1))
        seen = []
        take = tr.balance.take_aux_loss
        tr.balance.take_aux_loss = lambda: seen.append(take()) or seen[-1]
        tr.train_step()
        assert (seen[0] is None) == (alpha == 0.0) and not tr.balance.aux_terms
        params.append({n: p.detach().clone() for n, p in tr.model.named_parameters()})
    # The aux term's gradient reaches the routers through their float32 logits.
    router = "model.layers.2.mlp.gate.weight"
    assert not torch.equal(params[0][router], params[1][router])


def test_shared_expert_pool_gets_the_sum_of_its_layers_gradients(tok):
    shared = tiny_model(tok, seed=3)                               # layers 1-3 share layer 1's bank
    cfg = dict(shared.hf_config, experts_shared_frequency=1)      # each layer its own bank
    untied = build_model(cfg)
    sd = dict(shared.state_dict())
    for i in (2, 3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            sd[f"model.layers.{i}.mlp.experts.{proj}"] = sd[f"model.layers.1.mlp.experts.{proj}"].clone()
    untied.load_state_dict(sd)
    x = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    for m in (shared, untied):
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    for proj in ("gate_proj", "up_proj", "down_proj"):
        total = sum(getattr(untied.layers[i].mlp.experts, proj).grad for i in (1, 2, 3))
        torch.testing.assert_close(getattr(shared.layers[1].mlp.experts, proj).grad, total, atol=1e-6, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients(tok):
    a, b = tiny_model(tok, seed=5), tiny_model(tok, seed=5)
    enable_activation_checkpointing(b)
    x = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    docs = torch.tensor([[0] * 6 + [1] * 10, [2] * 16])
    for m in (a, b):
        torch.nn.functional.cross_entropy(m(x, cache=PackedContext(docs)).flatten(0, 1), x.flatten()).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_router_math_stays_float32_under_bf16_autocast(tmp_path, tok_dir):
    g = torch.Generator().manual_seed(0)
    router = Router(32, 8)
    router.weight.data.normal_(0, 0.5, generator=g)
    x = torch.randn(5, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router(x)
        other = torch.nn.functional.linear(x, router.weight)
    assert logits.dtype == torch.float32 and other.dtype == torch.bfloat16
    torch.testing.assert_close(logits, torch.nn.functional.linear(x, router.weight))
    # A whole training step under bf16 autocast (the GPU setting) runs and exports a loadable model.
    res = Trainer(pretrain_cfg(tmp_path, tok_dir, precision="bf16", steps=2, eval_every=2, save_every=2)).run()
    assert all(torch.isfinite(torch.tensor(res["losses"])))


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 1.0, 100, 10, 0.1) == pytest.approx(0.1)


def test_default_warmup_follows_the_run_length(tmp_path, tok_dir):
    # A short run reaches its learning rate (a fixed 100-step warm-up would never get there).
    res = Trainer(pretrain_cfg(tmp_path, tok_dir, steps=16, warmup_steps=None, save_every=100, eval_every=100))
    assert res.warmup_steps == 2
    res.run()
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert max(lrs) == pytest.approx(3e-3)
    from megrez.train.trainer import default_warmup

    assert [default_warmup(n) for n in (1, 16, 300, 5000)] == [1, 2, 30, 100]
    assert TrainConfig().bias_update_rate == 1e-2  # what docs/training.md recommends for runs like these


@pytest.mark.slow
def test_ctrl_c_saves_and_a_finished_run_says_so(tmp_path, tok_dir):
    import os
    import signal
    import subprocess
    import sys

    corpus = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megrez.cli", "train", "pretrain", "--preset", "megrez2-test", "--tokenizer",
           str(tok_dir), "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--batch-size", "2",
           "--steps", "100000", "--log-every", "1", "--save-every", "100000", "--eval-every", "100000", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    try:
        timing.wait_until(lambda: metrics.is_file() and metrics.read_text().count('"loss"') >= 3, timeout=120,
                          interval=0.2, message="training did not start")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=timing.Deadline(30).remaining())
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    step = ckpt.complete_checkpoints(out / "checkpoints")[-1][0]
    assert step >= 3 and f"interrupted at step {step}/100000: saved {out}/checkpoints/step_{step:06d}" in stderr
    # Asking for no more steps than are done: nothing to train, said so, the final model written.
    r = timing.run(cmd[:cmd.index("--steps") + 1] + [str(step)] + cmd[cmd.index("--steps") + 2:], timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"already trained: {step}/{step} steps done" in r.stderr and (out / "final/config.json").is_file()


# ------------------------------------------------------------------------------ trainer

def test_resume_after_interruption_is_bit_identical(tmp_path, tok_dir):
    straight = Trainer(pretrain_cfg(tmp_path / "a", tok_dir)).run()
    cfg = pretrain_cfg(tmp_path / "b", tok_dir, stop_after=3)  # "killed" after step 3; saved at step 2
    first = Trainer(cfg).run()
    assert first["stopped"] and [s for s, _ in ckpt.complete_checkpoints(Path(cfg.out) / "checkpoints")] == [2]
    # A write interrupted by the kill leaves only a hidden temporary directory behind.
    (Path(cfg.out) / "checkpoints" / ".step_000004.tmp-x").mkdir()
    cfg.stop_after = None
    resumed = Trainer(cfg).run()
    assert first["losses"] == straight["losses"][:3]
    assert resumed["losses"] == straight["losses"][2:]  # same floats, bit for bit
    assert resumed["val_loss"] == straight["val_loss"]
    steps = [json.loads(x).get("step") for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == \
        [s for s in (json.loads(x).get("step") for x in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines())
         if s is not None]
    assert not (Path(cfg.out) / "checkpoints" / ".step_000004.tmp-x").exists()


def test_resume_with_another_thread_count_says_it_will_not_be_bit_identical(tmp_path, tok_dir, capsys):
    cfg = pretrain_cfg(tmp_path / "b", tok_dir, stop_after=2)
    Trainer(cfg).run()
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        cfg.stop_after = None
        Trainer(cfg)
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert f"written with {before} CPU threads, this run has {before + 1}" in err
    assert f"OMP_NUM_THREADS={before}" in err


def test_gradient_accumulation_equals_one_large_batch(tmp_path, tok_dir):
    """Turn-level loss: the denominator is the number of turns in the whole global batch."""
    chat = write_chat(tmp_path / "chat.jsonl", 30)
    results = []
    for bs, accum in ((4, 1), (1, 4)):
        cfg = TrainConfig(stage="sft", preset="megrez2-test", tokenizer=str(tok_dir), data=[str(chat)],
                          val_fraction=0.1, out=str(tmp_path / f"b{bs}"), seq_len=48, batch_size=bs,
                          grad_accum=accum, steps=2, loss="turn", lr=1e-3, warmup_steps=1, eval_every=2,
                          save_every=2, progress=False, plots=False)
        tr = Trainer(cfg)
        losses = [tr.train_step()["loss"] for _ in range(2)]
        results.append((losses, {n: p.detach().clone() for n, p in tr.model.named_parameters()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for n, p in results[0][1].items():
        torch.testing.assert_close(p, results[1][1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_trained_checkpoints_load_in_the_engine_and_generate(tmp_path, tok_dir):
    from megrez.engine import SamplingParams
    from megrez.llm import LLM

    cfg = pretrain_cfg(tmp_path, tok_dir, steps=4, save_every=4, eval_every=4, plots=True)
    summary = Trainer(cfg).run()
    run = Path(cfg.out)
    assert (run / "loss.png").is_file() and (run / "expert_load.png").is_file()
    for path in (summary["final"], ckpt.latest_checkpoint(run)):
        llm = LLM(path, device="cpu")
        out = llm.generate("the lord said", SamplingParams(max_tokens=6, temperature=0.0))
        assert len(out.token_ids) > 0
    # The SFT stage starts from that checkpoint and trains on chat data with the turn-level loss.
    sft = TrainConfig(stage="sft", init=summary["final"], data=[str(write_chat(tmp_path / "chat.jsonl"))],
                      val_fraction=0.1, out=str(tmp_path / "sft"), seq_len=64, batch_size=2, epochs=1.0,
                      loss="turn", lr=1e-3, warmup_steps=1, eval_every=100, save_every=100, progress=False,
                      plots=False)
    res = Trainer(sft).run()
    assert res["step"] > 0 and "val_turn_loss" in res
    reply = LLM(res["final"], device="cpu").chat([{"role": "user", "content": "What is 1 + 2?"}],
                                                   SamplingParams(max_tokens=8, temperature=0.0))
    assert reply.finish_reason in ("stop", "length")


def test_cli_config_file_and_flags(tmp_path, tok_dir):
    from megrez.cli import main

    corpus = write_corpus(tmp_path / "c.txt")
    conf = tmp_path / "pt.json"
    conf.write_text(json.dumps({"preset": "megrez2-test", "tokenizer": str(tok_dir), "data": [str(corpus)],
                                "seq_len": 32, "batch_size": 2, "steps": 50, "progress": False, "plots": False}))
    assert main(["train", "pretrain", "--config", str(conf), "--steps", "2", "--out", str(tmp_path / "o"),
                 "--val-fraction", "0.1"]) == 0
    assert json.loads((tmp_path / "o/train_config.json").read_text())["steps"] == 2
    assert main(["train", "pretrain", "--config", str(conf), "--loss", "turn", "--out", str(tmp_path / "x")]) == 2


def test_bundled_model_chats_and_stops_at_turn_end():
    from megrez.engine import SamplingParams
    from megrez.llm import LLM, default_model

    path = default_model()
    if path.name != "megrez2-tiny-chat":
        pytest.skip("no bundled model in src/megrez/assets (built by runs/shipped_model.sh)")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["experts_shared_frequency"] == 3 and cfg["pre_gate"] is True
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) < 40 << 20
    llm = LLM(path, device="cpu")
    out = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(max_tokens=40, temperature=0.0))
    assert out.finish_reason == "stop" and out.text.strip()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path, tok_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    # Bit-identical continuation holds for a fixed thread count; MKL may otherwise pick its own.
    threads = str(min(2, os.cpu_count() or 1))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}

    def command(name):
        cfg = pretrain_cfg(tmp_path / name, tok_dir, steps=STEPS, save_every=7, eval_every=100, keep_checkpoints=2,
                           seq_len=64, batch_size=4)
        conf = tmp_path / f"{name}.json"
        conf.write_text(json.dumps({k: v for k, v in vars(cfg).items() if k != "stage"}, default=list))
        return [sys.executable, "-m", "megrez.cli", "train", "pretrain", "--config", str(conf)], Path(cfg.out)

    def losses(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if "loss" in r]

    STEPS = 300
    cmd, straight = command("straight")
    timing.run(cmd, timeout=300, env=env, check=True)
    cmd, killed = command("killed")
    rng = random.Random(0)
    kills = 0

    def steps_logged():
        path = killed / "metrics.jsonl"
        return max([json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip()] or [0]) \
            if path.is_file() else 0

    # Kills keyed to progress, not to wall time (which a busy machine stretches): the first in
    # start-up, the others at random steps ahead, so some land in steps and some in saves.
    for n in range(4):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if n == 0:
            time.sleep(rng.uniform(0.2, 1.0))
        else:
            target = min(STEPS - 1, steps_logged() + rng.randint(5, 60))
            deadline = timing.Deadline(300)
            while proc.poll() is None and steps_logged() < target and not deadline.expired():
                time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    timing.run(cmd, timeout=300, env=env, check=True)
    assert kills >= 3
    if losses(killed) != losses(straight):
        # Tell a resume bug from a machine whose arithmetic does not repeat across processes.
        cmd, control = command("control")
        timing.run(cmd, timeout=300, env=env, check=True)
        differ = [s for (s, a), (_, b) in zip(losses(control), losses(straight)) if a != b]
        if differ:
            pytest.skip(f"two uninterrupted runs in separate processes differ (first at step {differ[0]}, "
                        f"{len(differ)} of {STEPS} steps): this machine does not repeat its arithmetic "
                        f"across processes, so bit-identical resume cannot be judged here")
    assert losses(killed) == losses(straight)
    assert [s for s, _ in ckpt.complete_checkpoints(killed / "checkpoints")][-1] == STEPS
