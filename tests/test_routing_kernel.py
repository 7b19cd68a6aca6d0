"""The MoE routing kernel (kernels/routing.c): the router's product, scores, top-k choice and
weights of models.moe.route in one call, against a float64 reference with bounds derived from
the arithmetic; a row's routing never depends on the rows beside it or on the thread count;
equal choices go to the lower expert id; the model routes through it only where it applies."""
import pytest
import torch
from rounding import U32, gamma, linear_bound

from megrez.kernels import routing
from megrez.models.moe import RoutingConfig, Router, route, route_rows


def make_router(seed: int, experts: int = 64, hidden: int = 1024, bias_std: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    r = Router(hidden, experts)
    with torch.no_grad():
        r.weight.copy_(torch.randn(experts, hidden, generator=g) * 0.02)
        r.e_score_correction_bias.copy_(torch.randn(experts, generator=g) * bias_std)
    x = torch.randn(40, hidden, generator=g)
    return r, x


def reference(x, w, bias, cfg):
    """route() in float64: (choice [N, E], scores [N, E], selected weights before scaling)."""
    logits = x.double() @ w.double().T
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    choice = scores + bias.double() if (bias is not None and cfg.topk_method == "noaux_tc") else scores
    return logits, scores, choice


CONFIGS = [RoutingConfig(6), RoutingConfig(6, routed_scaling_factor=2.5),
           RoutingConfig(4, scoring_func="softmax", topk_method="greedy"),
           RoutingConfig(6, norm_topk_prob=False), RoutingConfig(1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scoring_func}-{c.topk_method}-k{c.top_k}"
                         f"-norm{int(c.norm_topk_prob)}-s{c.routed_scaling_factor}")
def test_routing_matches_float64(lib, cfg):
    r, x = make_router(1)
    bias = r.e_score_correction_bias
    with torch.no_grad():
        weights, indices = routing.route(x, r.weight, bias if cfg.topk_method == "noaux_tc" else None, cfg.top_k,
                                         cfg.scoring_func != "sigmoid", cfg.norm_topk_prob, cfg.routed_scaling_factor)
    logits, scores, choice = reference(x, r.weight, bias, cfg)
    # Logits: a float32 dot product in some order. Scores: sigmoid' <= 1/4 (softmax: the
    # logits' errors shift every score by at most 2 max|err| relatively), plus the
    # exponential's and division's roundings. Choices add one rounding of the bias sum.
    logit_err = linear_bound(x, r.weight)
    if cfg.scoring_func == "sigmoid":
        score_err = logit_err / 4 + 4 * U32 * scores
    else:
        score_err = scores * (2 * logit_err.max(-1, keepdim=True).values * 1.01 + gamma(x.shape[1] + 8))
    choice_err = score_err + 2 * U32 * choice.abs()
    order = choice.sort(-1, descending=True)
    k = cfg.top_k
    for n in range(x.shape[0]):
        # Where the k-th and (k+1)-th choices are further apart than the errors, the selected
        # set is the reference's, in the reference's order up to rounding-close neighbours.
        kth, nxt = order.values[n, k - 1], order.values[n, k]
        margin = kth - nxt
        if margin > 2 * choice_err[n].max():
            assert set(indices[n].tolist()) == set(order.indices[n, :k].tolist())
        got = choice[n, indices[n]]
        assert (got[:-1] + 2 * choice_err[n].max() >= got[1:]).all(), "not best choice first"
    sel = scores.gather(1, indices)
    sel_err = score_err.gather(1, indices)
    if cfg.norm_topk_prob and k > 1:
        total = sel.sum(-1, keepdim=True)
        ref = sel / total
        # Relative error of each weight: its own, the total's (k-1 additions), the division.
        rel = sel_err / sel + sel_err.sum(-1, keepdim=True) / total + (gamma(k) + 2 * U32)
        bound = ref * rel
    else:
        ref, bound = sel, sel_err
    ref = ref * cfg.routed_scaling_factor
    bound = bound * cfg.routed_scaling_factor + U32 * ref.abs()
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64
    assert ((weights.double() - ref).abs() <= bound).all()


def test_routing_of_a_row_alone_in_a_batch_and_any_thread_count(lib):
    r, x = make_router(2)
    bias = r.e_score_correction_bias
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            w1, i1 = routing.route(x, r.weight, bias, 6, False, True, 1.0)
            torch.set_num_threads(2)
            w2, i2 = routing.route(x, r.weight, bias, 6, False, True, 1.0)
            assert torch.equal(w1, w2) and torch.equal(i1, i2)
            for n in (0, 17, 39):
                wn, inn = routing.route(x[n:n + 1], r.weight, bias, 6, False, True, 1.0)
                assert torch.equal(wn, w1[n:n + 1]) and torch.equal(inn, i1[n:n + 1])
    finally:
        torch.set_num_threads(threads)


def test_equal_choices_go_to_the_lower_expert_id(lib):
    r, x = make_router(3, experts=8, hidden=32, bias_std=0.0)
    with torch.no_grad():
        r.weight[5] = r.weight[7]
        weights, indices = routing.route(x[:, :32], r.weight, None, 8, False, False, 1.0)
    pos5, pos7 = (indices == 5).int().argmax(-1), (indices == 7).int().argmax(-1)
    assert (pos5 < pos7).all()  # tied in every row: 5 first
    assert torch.equal(weights[indices == 5], weights[indices == 7])


def test_route_rows_uses_the_kernel_only_where_it_applies(lib):
    r, x = make_router(4)
    bias = r.e_score_correction_bias
    cfg = RoutingConfig(6)
    with torch.no_grad():
        fast = route_rows(x, r, bias, cfg)
        assert all(torch.equal(a, b) for a, b in zip(fast, routing.route(x, r.weight, bias, 6, False, True, 1.0)))
    # Training: torch's differentiable route().
    xg = x[:3].clone().requires_grad_(True)
    w, _ = route_rows(xg, r, bias, cfg)
    assert w.grad_fn is not None
    # Group-limited choice is not in the kernel: torch's route() decides.
    grouped = RoutingConfig(6, n_group=4, topk_group=2)
    with torch.no_grad():
        w, i = route_rows(x, r, bias, grouped)
        ref = route(r(x), bias, grouped)
    assert torch.equal(i, ref[1]) and torch.equal(w, ref[0])
    # A bfloat16 router is torch's too.
    assert routing.route(x, r.weight.bfloat16(), bias, 6, False, True, 1.0) is None


def test_routing_agrees_with_torch_route(lib):
    """The kernel and torch's route() select the same experts wherever the float64 choices
    are not tied to far within rounding, with weights equal up to float32 rounding."""
    r, x = make_router(5)
    bias = r.e_score_correction_bias
    cfg = RoutingConfig(6)
    with torch.no_grad():
        wk, ik = route_rows(x, r, bias, cfg)
        wt, it = route(r(x), bias, cfg)
    _, _, choice = reference(x, r.weight, bias, cfg)
    top = choice.topk(7, -1).values
    clear = (top[:, 5] - top[:, 6]) > 1e-5
    assert clear.sum() >= 30  # the check below covers most rows
    assert torch.equal(ik[clear].sort(-1).values, it[clear].sort(-1).values)
    a = wk[clear].gather(1, ik[clear].argsort(-1))
    b = wt[clear].gather(1, it[clear].argsort(-1))
    assert torch.allclose(a, b, rtol=1e-5, atol=0)
