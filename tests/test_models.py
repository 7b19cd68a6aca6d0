"""Shared runner over both architectures: shapes, cached decode vs recomputation, batches."""
import pytest
import torch
from rounding import rounding_noise

from megrez.loading import load_model
from megrez.models.base import PackedContext
from megrez.models.cache import KVCache

PROMPTS = [[5, 77, 300, 12, 640, 9, 81], [433, 2, 150], [700, 61, 18, 290, 404]]
# Paths that differ only in summation order (cached or batched decode through the CPU kernels,
# full recomputation through MKL) each deviate from exact logits by about float32's rounding
# noise for the model; they must agree within a small multiple of it.
NOISE_MULTIPLE = 16


@pytest.fixture(params=["tiny_moe", "tiny_dense"])
def model(request):
    return load_model(request.getfixturevalue(request.param), device="cpu", dtype="float32")


@pytest.fixture
def tol(model):
    noise, _ = rounding_noise(model, torch.tensor([PROMPTS[0] + [11, 23, 35, 47, 59]]))
    return NOISE_MULTIPLE * noise


BLOCK = 4


def make_cache(model, blocks=64):
    return KVCache(*model.kv_layout()[:1], blocks, BLOCK, *model.kv_layout()[1:], torch.float32, "cpu")


def tables(rows: int, length: int = 64, order=None) -> list[list[int]]:
    """Block tables for ``rows`` sequences of up to ``length`` tokens, blocks interleaved
    across rows (and ``order`` permuting the rows), so no row's blocks are consecutive."""
    per = -(-length // BLOCK)
    order = list(range(rows)) if order is None else order
    return [[1 + order[r] + rows * i for i in range(per)] for r in range(rows)]


def test_shapes(model):
    logits = model(torch.tensor([PROMPTS[0]]))
    assert logits.shape == (1, len(PROMPTS[0]), model.args.vocab_size)
    assert logits.dtype == torch.float32
    assert model(torch.tensor([PROMPTS[0]]), logits_at=torch.tensor([3])).shape == (1, model.args.vocab_size)


def test_cached_decode_equals_full_recomputation(model, tol):
    seq = PROMPTS[0] + [11, 23, 35, 47, 59]
    full = model(torch.tensor([seq]))[0]
    cache = make_cache(model)
    n = len(PROMPTS[0])
    table = [[5, 2, 9, 7]]  # scattered blocks
    step = model(torch.tensor([seq[:n]]), cache.view(torch.tensor([0]), n, table))[0]
    got = [step[-1]]
    for pos in range(n, len(seq) - 1):
        got.append(model(torch.tensor([[seq[pos]]]), cache.view(torch.tensor([pos]), 1, table))[0, -1])
    assert torch.allclose(torch.stack(got), full[n - 1:-1], atol=tol, rtol=0)


def test_padded_batch_equals_one_by_one(model, tol):
    """Rows of different lengths, right-padded, in blocks scattered over the cache."""
    longest = max(map(len, PROMPTS))
    tokens = torch.zeros(len(PROMPTS), longest, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        tokens[b, :len(p)] = torch.tensor(p)
    cache = make_cache(model)
    blocks = tables(3, order=[2, 0, 1])
    last = torch.tensor([len(p) - 1 for p in PROMPTS])
    batched = model(tokens, cache.view(torch.zeros(3, dtype=torch.long), longest, blocks, last + 1), logits_at=last)
    nxt = torch.tensor([[1], [2], [3]])
    batched_step = model(nxt, cache.view(last + 1, 1, blocks))[:, 0]
    for b, p in enumerate(PROMPTS):
        alone = model(torch.tensor([p + [int(nxt[b])]]))[0]
        assert torch.allclose(batched[b], alone[len(p) - 1], atol=tol, rtol=0)
        assert torch.allclose(batched_step[b], alone[-1], atol=tol, rtol=0)


def test_packed_documents_are_isolated(model, tol):
    a, b = PROMPTS[0], PROMPTS[2]
    packed = model(torch.tensor([a + b]), PackedContext(torch.tensor([[0] * len(a) + [1] * len(b)])))[0]
    assert torch.allclose(packed[:len(a)], model(torch.tensor([a]))[0], atol=tol, rtol=0)
    assert torch.allclose(packed[len(a):], model(torch.tensor([b]))[0], atol=tol, rtol=0)


@pytest.mark.parametrize("arch", ["tiny_moe", "tiny_dense"])
def test_bfloat16_load_is_close_to_float32(request, arch):
    path = request.getfixturevalue(arch)
    ids = torch.tensor([PROMPTS[0]])
    ref = load_model(path, dtype="float32")(ids)
    low_model = load_model(path, dtype="bfloat16")
    assert low_model.lm_head.weight.dtype == torch.bfloat16
    biases = [b for n, b in low_model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert all(b.dtype == torch.float32 for b in biases)  # selection must not be rounded
    low = low_model(ids).float()
    # bf16 can flip a near-tied expert choice, so compare the whole distribution.
    assert torch.nn.functional.cosine_similarity(low.flatten(), ref.flatten(), 0) > 0.99
