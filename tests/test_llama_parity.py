"""The Llama path (Megrez-3B) against Hugging Face transformers on the same random checkpoint."""
import pytest
import torch

from megrez import LLM, SamplingParams
from megrez.loading import load_model

transformers = pytest.importorskip("transformers")

PROMPT = [5, 77, 300, 12, 640, 9, 81, 433, 2, 150, 700, 61, 18, 290, 404, 33]


@pytest.fixture(scope="module")
def hf_model(tiny_dense):
    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_dense), dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(tiny_dense, hf_model):
    ours = load_model(tiny_dense, device="cpu", dtype="float32")
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        theirs = hf_model(ids).logits
        mine = ours(ids)
    diff = (mine - theirs).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e}"


def test_greedy_32_tokens_match_transformers(tiny_dense, hf_model):
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([PROMPT[:5]]), max_new_tokens=32, min_new_tokens=32,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    llm = LLM(tiny_dense, device="cpu", dtype="float32")
    mine = llm.generate(PROMPT[:5], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)).token_ids
    assert mine == theirs


def test_tied_embeddings_round_trip_and_match_transformers(tmp_path):
    from safetensors.torch import load_file

    from megrez.tiny import create_tiny

    path = create_tiny(tmp_path / "tied", "dense", seed=3, overrides={"tie_word_embeddings": True})
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    ours = load_model(path, device="cpu", dtype="float32")
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
