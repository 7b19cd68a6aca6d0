"""Megrez2 (MoE) against an independent float64 reference written from the architecture
facts, plus one test per architectural rule: the reference with that rule broken must
disagree with the package, so a package that broke the rule would fail the parity test."""
import pytest
import torch

from megrez import LLM, SamplingParams
from megrez.loading import load_model
from megrez.reference import Broken, Megrez2Reference

PROMPT = [5, 77, 300, 12, 640, 9, 81, 433, 2, 150, 700, 61, 18, 290, 404, 33]
TOL = 1e-4


def our_logits(path, bias_mode="own"):
    model = load_model(path, device="cpu", dtype="float32", router_bias=bias_mode)
    return model(torch.tensor([PROMPT]))[0].double()


@pytest.fixture(scope="module")
def ours(tiny_moe):
    return our_logits(tiny_moe)


@pytest.fixture(scope="module")
def reference(tiny_moe):
    return Megrez2Reference(tiny_moe).logits(PROMPT)


def test_logits_match_float64_reference(ours, reference):
    diff = (ours - reference).abs().max().item()
    assert diff <= TOL, f"max |logit diff| {diff:.2e} > {TOL}"


@pytest.mark.slow
def test_greedy_tokens_match_reference(tiny_moe):
    llm = LLM(tiny_moe, device="cpu", dtype="float32")
    out = llm.generate(PROMPT[:6], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert out.token_ids == Megrez2Reference(tiny_moe).greedy(PROMPT[:6], 32)


@pytest.mark.parametrize("rule", [
    "router_reads_current_layer", "non_owner_uses_other_group", "bias_in_weights", "ignore_groups",
    "ignore_scaling"])
def test_each_rule_changes_the_output(tiny_moe, ours, reference, rule):
    broken = Megrez2Reference(tiny_moe, broken=Broken(**{rule: True})).logits(PROMPT)
    # Breaking the rule moves the logits far beyond the parity tolerance ...
    assert (broken - reference).abs().max().item() > 100 * TOL
    # ... and the package sides with the faithful reference, not the broken one.
    assert (ours - broken).abs().max().item() > 100 * TOL
    assert (ours - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("mode", ["owner", "none"])
def test_router_bias_modes_match_reference(tiny_moe, reference, mode):
    ours_mode = our_logits(tiny_moe, mode)
    ref_mode = Megrez2Reference(tiny_moe, bias_mode=mode).logits(PROMPT)
    assert (ours_mode - ref_mode).abs().max().item() <= TOL
    assert (ref_mode - reference).abs().max().item() > 100 * TOL, f"bias mode {mode} indistinguishable from own"


def test_experts_are_stored_once_per_group(tiny_moe):
    model = load_model(tiny_moe, device="cpu")
    banks = [layer.mlp.experts for layer in model.layers if getattr(layer.mlp, "experts", None) is not None]
    assert len(banks) == 2  # 6 MoE layers, sharing groups of 3
    names = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert all(n.startswith(("model.layers.1.", "model.layers.4.")) for n in names)


def test_decode_touches_only_selected_experts(tiny_moe):
    """Routing hooks see which experts each layer chose; one decode token selects top_k."""
    model = load_model(tiny_moe, device="cpu")
    seen = []
    model.routing_hooks.append(lambda layer, idx, w: seen.append((layer, idx.clone())))
    model(torch.tensor([[5]]))
    assert [layer for layer, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert all(idx.shape == (1, model.args.num_experts_per_tok) for _, idx in seen)
