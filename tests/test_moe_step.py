"""A whole Megrez2 decoding step in one kernel call (kernels/moe_step.c, Model.decode_all_layers):
the logits, the KV cache and the routing the hooks see are those of the layer-by-layer loop, bit
for bit, with and without pre-gating, for each quantization scheme and routing rule; a replaced
weight is picked up; the loop runs wherever the step does not apply; the engine decodes the
same tokens through it; a Llama model (every layer dense) runs through it too."""
import copy

import pytest
import torch

from megrez import kernels
from megrez.bench import random_model
from megrez.kernels import moe_step
from megrez.models import megrez_moe
from megrez.models.cache import KVCache
from megrez.presets import PRESETS
from megrez.quant.formats import QuantTensor

# Two sharing groups and a partial third (7 layers: dense, then 3 + 3), several shared experts,
# rows wide enough for the K formats.
SHAPE = {**PRESETS["megrez2-test"], "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64,
         "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "n_routed_experts": 16, "num_experts_per_tok": 3, "n_shared_experts": 2}


WHOLE_STEP = megrez_moe.Model.decode_all_layers  # TransformerLM's: Megrez2 and Llama alike
# Megrez-3B's architecture, small: every layer dense, all in the one call
LLAMA_SHAPE = {**PRESETS["llama-test"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}


@pytest.fixture
def shape(monkeypatch):
    def make(**changes):
        monkeypatch.setitem(PRESETS, "moe-step-test", {**SHAPE, **changes})
        return "moe-step-test"
    return make


def one_step(model, monkeypatch, fused: bool, seed: int = 2, prompt: int = 11):
    """Logits of one decoded token after a prompt, the cache after it, and the routing hooks' calls."""
    layers, n_kv, hd = model.kv_layout()
    cache = KVCache(layers, 8, 4, n_kv, hd, torch.float32, "cpu")
    table = [5, 2, 7, 0]
    g = torch.Generator().manual_seed(seed)
    seen = []
    with torch.no_grad():
        model(torch.randint(0, model.args.vocab_size, (1, prompt), generator=g), cache.view([0], prompt, [table]))
        token = torch.randint(0, model.args.vocab_size, (1, 1), generator=g)
        calls = []
        monkeypatch.setattr(type(model), "decode_all_layers",
                            (lambda self, *a: calls.append(WHOLE_STEP(self, *a)) or calls[-1]) if fused else
                            (lambda self, *a: None))
        hook = lambda i, idx, w: seen.append((i, idx.clone(), w.clone()))  # noqa: E731
        hooks = getattr(model, "routing_hooks", [])  # a dense model has none
        hooks.append(hook)
        try:
            logits = model(token, cache.view([prompt], 1, [table]))
        finally:
            hooks.remove(hook)
    if fused:
        assert calls and calls[0] is not None, "the step did not run in one kernel call"
    return logits, [k.clone() for k in cache.k] + [v.clone() for v in cache.v], seen


def assert_same_step(a, b):
    (la, ca, ha), (lb, cb, hb) = a, b
    assert torch.equal(la, lb)
    assert all(torch.equal(x, y) for x, y in zip(ca, cb))
    assert [i for i, _, _ in ha] == [i for i, _, _ in hb]
    for (_, ia, wa), (_, ib, wb) in zip(ha, hb):
        assert torch.equal(ia, ib) and torch.equal(wa, wb)


@pytest.mark.parametrize("scheme", ["q4_k_m", "q8_0", "q4_0"])
@pytest.mark.parametrize("changes", [{}, {"pre_gate": False}, {"scoring_func": "softmax", "topk_method": "greedy"},
                                     {"norm_topk_prob": False, "routed_scaling_factor": 2.5}],
                         ids=["pre-gate", "no-pre-gate", "softmax-greedy", "unnormalised-scaled"])
def test_whole_step_gives_the_bits_of_the_layer_loop(lib, monkeypatch, shape, scheme, changes):
    torch.manual_seed(0)
    model = random_model(shape(**changes), torch.device("cpu"), torch.float32, quantization=scheme).eval()
    fused = one_step(model, monkeypatch, True)
    loop = one_step(model, monkeypatch, False)
    assert_same_step(fused, loop)
    moe_layers = [i for i in range(model.args.num_hidden_layers) if model.args.is_moe(i)]
    assert [i for i, _, _ in fused[2]] == moe_layers


def test_a_replaced_weight_is_picked_up(lib, monkeypatch, shape):
    torch.manual_seed(0)
    model = random_model(shape(), torch.device("cpu"), torch.float32, quantization="q8_0").eval()
    before = one_step(model, monkeypatch, True)
    router = model.layers[2].mlp.gate
    router.weight = torch.nn.Parameter(torch.randn_like(router.weight) * 0.1, requires_grad=False)
    after = one_step(model, monkeypatch, True)
    assert not torch.equal(before[0], after[0])
    assert_same_step(after, one_step(model, monkeypatch, False))
    with torch.no_grad():
        router.weight.mul_(-1.0)  # in place: the plan's pointers see it
    assert_same_step(one_step(model, monkeypatch, True), one_step(model, monkeypatch, False))
    # a quantized weight (a plain attribute, not a parameter), then a whole module, each alone
    previous = one_step(model, monkeypatch, True)
    q = model.layers[1].self_attn.q_proj
    q.weight = QuantTensor(q.weight.data.flip(0).contiguous(), q.weight.qtype, q.weight.shape)
    step = one_step(model, monkeypatch, True)
    assert not torch.equal(previous[0], step[0])
    assert_same_step(step, one_step(model, monkeypatch, False))
    shared = model.layers[2].mlp.shared_experts
    replacement = copy.deepcopy(shared)
    down = replacement.down_proj.weight
    down.data.copy_(down.data.flip(0))  # the same blocks in another row order
    model.layers[2].mlp.shared_experts = replacement
    again = one_step(model, monkeypatch, True)
    assert not torch.equal(step[0], again[0])
    assert_same_step(again, one_step(model, monkeypatch, False))


def test_the_layer_loop_runs_where_the_step_does_not_apply(lib, monkeypatch, shape):
    torch.manual_seed(0)
    model = random_model(shape(), torch.device("cpu"), torch.float32).eval()  # float weights
    assert model._decode_plan() is None
    grouped = random_model(shape(n_group=4, topk_group=2), torch.device("cpu"), torch.float32,
                           quantization="q8_0").eval()
    assert grouped._decode_plan() is None
    quant = random_model(shape(), torch.device("cpu"), torch.float32, quantization="q8_0").eval()
    assert quant._decode_plan() is not None
    quant.routing_override = lambda i, w, idx: (w, idx)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="one kernel call"):
            one_step(quant, monkeypatch, True)


def test_an_inconsistent_description_is_refused(lib, shape):
    torch.manual_seed(0)
    model = random_model(shape(), torch.device("cpu"), torch.float32, quantization="q8_0").eval()
    plan = model._decode_plan()
    plan.layers[plan.n - 1].route_next = 1  # no layer after the last to route
    layers, n_kv, hd = model.kv_layout()
    cache = KVCache(layers, 4, 4, n_kv, hd, torch.float32, "cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match="megrez_moe_decode_step failed"):
        moe_step.run(plan, torch.zeros(1, model.args.hidden_size), torch.ones(hd), torch.zeros(hd), cache.k, cache.v,
                     torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))


def test_engine_decodes_the_same_tokens_through_the_step(lib, monkeypatch, shape):
    from megrez.engine.engine import Engine
    from megrez.engine.sampling import SamplingParams

    torch.manual_seed(0)
    model = random_model(shape(), torch.device("cpu"), torch.float32, quantization="q4_k_m").eval()
    calls = []
    real = moe_step.run
    monkeypatch.setattr(moe_step, "run", lambda *a: calls.append(1) or real(*a))

    def generate(use_step: bool):
        if not use_step:
            monkeypatch.setattr(megrez_moe.Model, "decode_all_layers", lambda self, *a: None)
        engine = Engine(model, None, max_num_seqs=1, max_model_len=64, kv_cache_memory=1 << 24)
        req = engine.add_request(list(range(3, 20)), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        engine.run_to_completion([req])
        return req.output_ids

    stepped = generate(True)
    assert len(calls) >= 15, "the engine did not decode through the whole-step kernel"
    assert stepped == generate(False)
    assert kernels.enabled


@pytest.mark.parametrize("scheme", ["q4_k_m", "q8_0"])
def test_a_llama_model_decodes_in_one_call_with_the_bits_of_the_layer_loop(lib, monkeypatch, scheme):
    from megrez.engine.engine import Engine
    from megrez.engine.sampling import SamplingParams

    monkeypatch.setitem(PRESETS, "llama-step-test", LLAMA_SHAPE)
    torch.manual_seed(0)
    model = random_model("llama-step-test", torch.device("cpu"), torch.float32, quantization=scheme).eval()
    assert_same_step(one_step(model, monkeypatch, True), one_step(model, monkeypatch, False))
    monkeypatch.setattr(type(model), "decode_all_layers", WHOLE_STEP)  # one_step left the loop on
    calls = []
    real = moe_step.run
    monkeypatch.setattr(moe_step, "run", lambda *a: calls.append(1) or real(*a))

    def generate():
        engine = Engine(model, None, max_num_seqs=1, max_model_len=64, kv_cache_memory=1 << 24)
        req = engine.add_request(list(range(3, 20)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        engine.run_to_completion([req])
        return req.output_ids

    stepped = generate()
    assert len(calls) >= 11, "the engine did not decode through the whole-step kernel"
    monkeypatch.setattr(type(model), "decode_all_layers", lambda self, *a: None)
    assert stepped == generate()
