"""The decode-step kernels (kernels/decode_ops.c): attention of one new token per row against the
paged KV cache (RoPE and cache write included) and RMSNorm, against float64 references with
bounds derived from the arithmetic; a row's result never depends on the rows beside it or on the
thread count; the engine uses them and generates the tokens torch's operators give."""
import math

import pytest
import torch
from rounding import U32, gamma

from megrez import kernels
from megrez.kernels import decode_ops
from megrez.models.base import RMSNorm, Rotary, apply_rotary


@pytest.mark.parametrize("n", [1000, 64, 3])
def test_rms_norm_matches_float64(lib, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    w = torch.randn(n, generator=g)
    with torch.no_grad():
        y = decode_ops.rms_norm(x, w, 1e-6)
    x64 = x.double()
    inv = 1.0 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = w.double() * (x64 * inv)
    # The sum of squares (positive terms) in any order: gamma(n) relative; then the mean, eps,
    # sqrt, reciprocal and two products: a few roundings each.
    bound = ref.abs() * (gamma(n) / 2 + 8 * U32)
    assert ((y.double() - ref).abs() <= bound).all()
    with torch.no_grad():
        for r in range(6):  # each row alone: the same bits
            assert torch.equal(decode_ops.rms_norm(x[r:r + 1], w, 1e-6), y[r:r + 1])


def test_rms_norm_module_uses_the_kernel_only_without_autograd(lib):
    norm = RMSNorm(48, 1e-5)
    x = torch.randn(2, 3, 48, requires_grad=True)
    y = norm(x)
    y.sum().backward()  # training: torch's operators, differentiable
    assert x.grad is not None and y.grad_fn is not None
    with torch.no_grad():
        y2 = norm(x)
        assert torch.equal(y2, decode_ops.rms_norm(x, norm.weight, 1e-5))
    assert torch.allclose(y2, y.detach(), rtol=1e-5, atol=1e-6)


def make_step(seed: int, head_dim: int, n_heads: int = 6, n_kv: int = 2, block_size: int = 4):
    """A decode step of three rows of different lengths over shuffled blocks, two of them sharing
    their first (full) block, as prefix caching leaves them."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 12
    kc = torch.randn(n_kv, num_blocks, block_size, head_dim, generator=g)
    vc = torch.randn(n_kv, num_blocks, block_size, head_dim, generator=g)
    tables = torch.tensor([[5, 2, 9, 0], [5, 7, 0, 0], [11, 3, 8, 1]])
    lengths = torch.tensor([10, 6, 16])
    rows = len(lengths)
    q = torch.randn(rows, n_heads * head_dim, generator=g) * 2
    k = torch.randn(rows, n_kv * head_dim, generator=g) * 2
    v = torch.randn(rows, n_kv * head_dim, generator=g)
    cos, sin = Rotary(head_dim, 10000.0, None).cos_sin((lengths - 1)[:, None], torch.float32)
    return dict(q=q, k=k, v=v, cos=cos.view(rows, head_dim), sin=sin.view(rows, head_dim), k_cache=kc,
                v_cache=vc, tables=tables, lengths=lengths, n_heads=n_heads, scale=head_dim ** -0.5)


def run_step(step):
    step = {k: v.clone() if torch.is_tensor(v) else v for k, v in step.items()}
    with torch.no_grad():
        out = decode_ops.decode_attention(**step)
    return out, step["k_cache"], step["v_cache"]


def slot(step, row, pos):
    bs = step["k_cache"].shape[2]
    return int(step["tables"][row, pos // bs]), pos % bs


@pytest.mark.parametrize("head_dim", [64, 12])
def test_decode_attention_matches_float64(lib, head_dim):
    step = make_step(head_dim, head_dim)
    out, kc, vc = run_step(step)
    n_kv, hd, nh = kc.shape[0], head_dim, step["n_heads"]
    rep = nh // n_kv
    rows = step["q"].shape[0]
    written = set()
    for r in range(rows):
        pos = int(step["lengths"][r]) - 1
        block, off = slot(step, r, pos)
        written.add((block, off))
        rot = lambda x: apply_rotary(x.view(-1, hd), step["cos"][r], step["sin"][r])  # noqa: E731
        # The new key is rotated exactly as torch rotates it, the value stored as is.
        assert torch.equal(kc[:, block, off], rot(step["k"][r]))
        assert torch.equal(vc[:, block, off], step["v"][r].view(n_kv, hd))
        q = rot(step["q"][r]).double()
        for h in range(nh):
            gi = h // rep
            keys = torch.stack([kc[gi, slot(step, r, s)[0], slot(step, r, s)[1]] for s in range(pos + 1)]).double()
            vals = torch.stack([vc[gi, slot(step, r, s)[0], slot(step, r, s)[1]] for s in range(pos + 1)]).double()
            scores = keys @ q[h] * step["scale"]
            p = torch.softmax(scores, 0)
            ref = p @ vals
            # Scores: a dot product (gamma(hd) of its |terms|) and the scale; softmax and the
            # weighted sum of values: a few roundings per term, and gamma(len) for the sums.
            e = (step["scale"] * gamma(hd) * (keys.abs() @ q[h].abs()) + U32 * scores.abs()).max().item()
            bound = (p @ vals.abs()) * (math.expm1(2 * e) + gamma(2 * (pos + 1) + 10))
            got = out[r].view(nh, hd)[h].double()
            assert ((got - ref).abs() <= bound).all(), (r, h, (got - ref).abs().max().item())
    # Nothing else in the cache moved.
    mask = torch.ones(kc.shape[1:3], dtype=torch.bool)
    for block, off in written:
        mask[block, off] = False
    assert torch.equal(kc[:, mask], step["k_cache"][:, mask]) and torch.equal(vc[:, mask], step["v_cache"][:, mask])


def test_decode_attention_row_alone_or_in_a_batch_and_any_thread_count(lib):
    step = make_step(3, 64)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(run_step(step)[0])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs)
    for r in range(3):
        alone = {**step, **{k: step[k][r:r + 1] for k in ("q", "k", "v", "cos", "sin", "tables", "lengths")}}
        assert torch.equal(run_step(alone)[0], outs[0][r:r + 1])


@pytest.mark.parametrize("head_dim,n_heads", [(64, 8), (64, 6), (80, 16), (20, 4), (12, 6)])
def test_every_build_variant_gives_the_same_bits(lib, monkeypatch, head_dim, n_heads):
    """The float sums run in 16 lanes in one fixed order (lanes.h), whatever the instruction set:
    shapes that take the register-held path (4 heads per KV head), fewer heads, head dims with a
    partial group of vectors and with a remainder of 16."""
    from megrez.kernels import build

    step = make_step(7, head_dim, n_heads=n_heads)
    x = torch.randn(3, 7 * head_dim + 5, generator=torch.Generator().manual_seed(head_dim))
    w = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ["scalar"] + [v for v in build.runnable_variants() if v != "scalar"]:
        try:
            variant = build.load_variant(name)
        except build.BuildError:
            assert name != "scalar"
            continue
        decode_ops.declare(variant)
        monkeypatch.setattr(decode_ops, "_lib", lambda v=variant: v)
        with torch.no_grad():
            results[name] = (*run_step(step), decode_ops.rms_norm(x, w, 1e-6))
    assert len(results) >= 1
    for name, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, results["scalar"])), name


def test_decode_attention_refuses_a_block_outside_the_cache(lib):
    step = make_step(4, 16)
    step["tables"] = step["tables"].clone()
    step["tables"][1, 1] = 12  # the cache has 12 blocks
    before = step["k_cache"].clone()
    with pytest.raises(RuntimeError, match="invalid cache layout"):
        run_step(step)
    assert torch.equal(step["k_cache"], before)


def test_decode_attention_declines_what_it_does_not_compute(lib):
    step = make_step(5, 16)
    with torch.no_grad():
        assert decode_ops.decode_attention(**{**step, "q": step["q"].bfloat16()}) is None
    assert decode_ops.decode_attention(**step) is None  # autograd on


def test_engine_decodes_through_the_kernel_to_the_tokens_of_torch_operators(lib, monkeypatch):
    from megrez.bench import random_model
    from megrez.engine.engine import Engine
    from megrez.engine.sampling import SamplingParams

    torch.manual_seed(0)
    model = random_model("megrez2-test", torch.device("cpu"), torch.float32).eval()
    calls = []
    real = decode_ops.decode_attention
    monkeypatch.setattr(decode_ops, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    def generate(use_kernels: bool):
        monkeypatch.setattr(kernels, "enabled", use_kernels)
        engine = Engine(model, None, max_num_seqs=3, max_model_len=96, kv_cache_memory=1 << 26)
        reqs = [engine.add_request(list(range(1 + i, 20 + 5 * i)),
                                   SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for i in range(3)]
        engine.run_to_completion(reqs)
        return [r.output_ids for r in reqs]

    fused = generate(True)
    assert calls, "the engine did not use the decode attention kernel"
    assert fused == generate(False)


@pytest.mark.parametrize("shape, scheme", [("llama-test", "q8_0"), ("llama-test", "q4_k_m"), ("megrez2-test", "q4_k_m")])
def test_fused_decoder_layer_gives_the_bits_of_the_modules_one_by_one(lib, monkeypatch, shape, scheme):
    """A decode step whose layers run as one kernel call each (quantized weights) against the
    same step run module by module: the same logits and the same cache, bit for bit, for rows
    of different lengths sharing a block."""
    from megrez.bench import random_model
    from megrez.models.cache import KVCache

    torch.manual_seed(1)
    model = random_model(shape, torch.device("cpu"), torch.float32, quantization=scheme).eval()
    layers, n_kv, hd = model.kv_layout()
    cache = KVCache(layers, 12, 4, n_kv, hd, torch.float32, "cpu")
    tables = [[3, 7, 1], [3, 5, 4], [9, 2, 11, 6]]
    lengths = [9, 5, 13]  # tokens cached before this step; rows 0 and 1 share block 3
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for b, (table, n) in enumerate(zip(tables, lengths)):
            prompt = torch.randint(0, model.args.vocab_size, (1, n), generator=g)
            model(prompt, cache.view([0], n, [table]))
        tokens = torch.randint(0, model.args.vocab_size, (3, 1), generator=g)
        keys, values = [k.clone() for k in cache.k], [v.clone() for v in cache.v]

        calls = []
        real = decode_ops.decode_layer
        monkeypatch.setattr(decode_ops, "decode_layer", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
        fused = model(tokens, cache.view(lengths, 1, tables))
        assert len(calls) == layers and all(c is not None for c in calls), "the layers did not run fused"
        fused_k, fused_v = [k.clone() for k in cache.k], [v.clone() for v in cache.v]

        for i in range(layers):
            cache.k[i].copy_(keys[i])
            cache.v[i].copy_(values[i])
        monkeypatch.setattr(decode_ops, "decode_layer", lambda *a, **k: None)
        plain = model(tokens, cache.view(lengths, 1, tables))
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_k, cache.k)) and all(torch.equal(a, b) for a, b in zip(fused_v, cache.v))
