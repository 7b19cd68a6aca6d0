"""CUDA against the CPU float32 path (skipped without a GPU): the same checkpoint, the same
greedy tokens, offloading that changes nothing but where experts live.

    PYTHONPATH=src python -m pytest -q -m gpu tests/test_gpu.py
"""
import pytest
import torch

from megrez import LLM, SamplingParams
from megrez.loading import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = [5, 77, 300, 12, 640, 9, 81, 433, 2, 150, 700, 61, 18, 290, 404, 33]


@pytest.fixture(autouse=True)
def exact_float32():
    # TF32 matmuls would make float32 on the GPU differ from the CPU by far more than rounding.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("arch", ["tiny_moe", "tiny_dense"])
def test_cuda_logits_match_cpu(request, arch):
    path = request.getfixturevalue(arch)
    ids = torch.tensor([PROMPT])
    ref = load_model(path, device="cpu", dtype="float32")(ids)
    fp32 = load_model(path, device="cuda", dtype="float32")(ids.cuda()).cpu()
    bf16 = load_model(path, device="cuda", dtype="bfloat16")(ids.cuda()).float().cpu()
    assert (fp32 - ref).abs().max() < 1e-4
    assert torch.nn.functional.cosine_similarity(bf16.flatten(), ref.flatten(), 0) > 0.99


@pytest.mark.parametrize("arch", ["tiny_moe", "tiny_dense"])
def test_cuda_greedy_64_tokens_match_cpu(request, arch):
    path = request.getfixturevalue(arch)
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    cpu = LLM(path, device="cpu", dtype="float32").generate([PROMPT, PROMPT[:5]], greedy)
    gpu = LLM(path, device="cuda", dtype="float32").generate([PROMPT, PROMPT[:5]], greedy)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]


def test_cuda_offload_matches_all_on_gpu(tiny_moe):
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    full = LLM(tiny_moe, device="cuda", dtype="float32")
    expected = full.generate([PROMPT, PROMPT[:5]], greedy)
    resident = sum(p.numel() * 4 for n, p in full.model.named_parameters() if ".experts." not in n)
    for slots, prefetch in ((32, True), (8, True), (6, False)):
        budget = resident + (4 << 20) + (256 << 20) + slots * 3 * 64 * 32 * 4
        llm = LLM(tiny_moe, device="cuda", dtype="float32", gpu_memory_budget=budget, kv_cache_memory=4 << 20,
                  prefetch=prefetch)
        got = llm.generate([PROMPT, PROMPT[:5]], greedy)
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        assert llm.offload.stats["uses"] > 0
