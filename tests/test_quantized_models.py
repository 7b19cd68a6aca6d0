"""Quantized models: the recipe's types, every linear layer covered (routed experts included),
logits of the quantized model equal the float model run on the dequantized weights, batch
invariance, streaming memory, and refusing checkpoints quantized by other tools."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from megrez import LLM, SamplingParams, kernels
from megrez.loading import load_model
from megrez.models import ConfigError
from megrez.quant.formats import QType, QuantTensor
from megrez.quant.modules import QuantEmbedding, QuantExpertBank, QuantLinear, quant_tensors
from megrez.quant.recipe import tensor_types, use_more_bits


def test_use_more_bits_picks_llama_cpp_layers():
    # Megrez-3B (32 layers): first/last 4 and every third layer between, starting at 6.
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    # Megrez2 (31 layers): expert banks live on layers 1, 4, ..., 28; those of 1 and 28 get Q6_K.
    assert [i for i in range(1, 31, 3) if use_more_bits(i, 31)] == [1, 28]


def test_q4_k_m_recipe_on_megrez2_shape():
    from megrez.models import build_model
    from megrez.presets import PRESETS

    with torch.device("meta"):
        model = build_model(PRESETS["megrez2-3x7b-a3b"])
    types = tensor_types(model, "q4_k_m")
    assert types["lm_head.weight"] == QType.Q6_K
    assert types["model.embed_tokens.weight"] == QType.Q4_K
    assert "model.layers.1.mlp.gate.weight" not in types  # the router stays float32
    assert types["model.layers.4.mlp.experts.gate_proj"] == QType.Q4_K
    assert types["model.layers.0.self_attn.v_proj.weight"] == QType.Q6_K
    assert types["model.layers.4.self_attn.v_proj.weight"] == QType.Q4_K
    assert types["model.layers.5.self_attn.v_proj.weight"] == QType.Q6_K
    # Expert rows of 1408 are not whole super-blocks: down falls back as llama.cpp does,
    # Q6_K (layers 1 and 28) to Q8_0 and Q4_K to Q5_0.
    assert types["model.layers.1.mlp.experts.down_proj"] == QType.Q8_0
    assert types["model.layers.28.mlp.experts.down_proj"] == QType.Q8_0
    assert types["model.layers.4.mlp.experts.down_proj"] == QType.Q5_0
    # Shared experts: 4 x 1408 = 5632 = 22 x 256.
    assert types["model.layers.4.mlp.shared_experts.down_proj.weight"] == QType.Q4_K
    assert types["model.layers.5.mlp.shared_experts.down_proj.weight"] == QType.Q6_K
    linear = [n for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("mlp.gate.weight")]
    assert sorted(types) == sorted(linear)


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_k_m"])
def test_every_linear_layer_is_quantized(tiny_moe, scheme):
    model = load_model(tiny_moe, device="cpu", quantization=scheme)
    assert not [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    banks = [m for m in model.modules() if isinstance(m, QuantExpertBank)]
    assert len(banks) == 2 and isinstance(banks[0].gate_proj, QuantTensor)
    assert all(isinstance(m.weight, QuantTensor) for m in model.modules() if isinstance(m, QuantLinear))
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32


@pytest.fixture(scope="module")
def float_and_q8(tiny_moe):
    return tiny_moe, load_model(tiny_moe, device="cpu"), load_model(tiny_moe, device="cpu", quantization="q8_0")


def test_quantized_logits_equal_float_model_on_dequantized_weights(float_and_q8):
    path, base, quant = float_and_q8
    reference = {n: qt.dequantize() for n, qt in quant_tensors(quant).items()}
    names = base.checkpoint_names()
    params = dict(base.named_parameters())
    with torch.no_grad():
        for ours, _ in set(names.values()):
            if ours in reference:
                params[ours].copy_(reference[ours])
    tokens = torch.randint(0, base.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = base(tokens), quant(tokens)
        kernels.enabled = False  # the reference path: dequantize, then torch's float32 products
        try:
            exact = quant(tokens)
        finally:
            kernels.enabled = True
    # Same weights, same float32 math; only the summation order of the products may differ.
    scale = want.abs().amax()
    assert (exact - want).abs().max() <= 1e-4 * scale
    # The CPU kernels also round the activations to 8 bits per block, as llama.cpp does (their
    # bound per product: tests/test_quantized_kernels.py): close to the same model, not equal.
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # And the quantized model is close to the float model it came from.
    with torch.no_grad():
        original = load_model(path, device="cpu")(tokens)
    agree = (original.argmax(-1) == got.argmax(-1)).float().mean()
    assert agree >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["q8_0", "q4_k_m"])
def test_quantized_batch_equals_one_by_one(tiny_moe, scheme):
    llm = LLM(tiny_moe, device="cpu", quantization=scheme, max_num_seqs=3)
    prompts = [[5, 77, 300, 12, 640, 9, 81], [433, 2, 150], [700, 61, 18, 290, 404]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = [llm.generate(p, greedy).token_ids for p in prompts]
    assert [c.token_ids for c in llm.generate(prompts, greedy)] == alone


def test_checkpoint_quantized_by_another_tool_is_refused(tiny_moe, tmp_path):
    d = tmp_path / "gptq"
    shutil.copytree(tiny_moe, d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quantization_config.*gptq"):
        load_model(d)
    from megrez.cli import main

    assert main(["info", str(d)]) == 2


def test_unknown_quantization_is_refused(tiny_moe):
    with pytest.raises(ValueError, match="unsupported quantization 'q3_k'"):
        load_model(tiny_moe, quantization="q3_k")


def test_quantized_model_cannot_be_saved_as_safetensors(tiny_moe, tmp_path):
    from megrez.loading import save_model

    with pytest.raises(ValueError, match="save it as GGUF"):
        save_model(load_model(tiny_moe, quantization="q8_0"), tmp_path / "out")


def test_cli_generate_and_info_with_quantization(tiny_moe, capsys):
    from megrez.cli import main

    assert main(["generate", "--model", str(tiny_moe), "--quantization", "q4_k_m", "--prompt-ids", "5,77,300",
                 "--max-tokens", "5", "--temperature", "0", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 5
    assert main(["info", str(tiny_moe)]) == 0
    assert "q4_k_m" in capsys.readouterr().out


@pytest.mark.slow
def test_quantize_on_load_streams(tmp_path):
    """Quantizing while loading a ~130 MB float32 checkpoint: peak RSS grows by about the
    quantized model (Q8_0: ~27% of float32), never by the float model."""
    from megrez.tiny import create_tiny

    path = create_tiny(tmp_path / "big", "moe", overrides=dict(
        hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_attention_heads=8,
        num_key_value_heads=2, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4))
    size = (path / "model.safetensors").stat().st_size
    code = ("import resource, torch, megrez.loading as L\n"
            "from megrez.quant.modules import quantized_bytes\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"m = L.load_model({str(path)!r}, progress=False, quantization='q8_0')\n"
            "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024\n"
            "print(grew, quantized_bytes(m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    grew, qbytes = int(out[0]), int(out[1])
    assert size > 100e6 and qbytes < 0.3 * size
    assert grew < qbytes + 0.2 * size, f"peak RSS grew {grew / 1e6:.0f} MB for {qbytes / 1e6:.0f} MB of weights"


def test_bench_builds_random_quantized_models_without_float_weights():
    from megrez.bench import random_model, weight_bytes

    cpu = torch.device("cpu")
    plain = random_model("megrez2-mini", cpu, torch.float32)
    quant = random_model("megrez2-mini", cpu, torch.float32, quantization="q8_0")
    assert quant.parameter_counts() == plain.parameter_counts()
    assert not [m for m in quant.modules() if isinstance(m, torch.nn.Linear)]
    wq, wf = weight_bytes(quant), weight_bytes(plain)
    assert wq["expert"] == wf["expert"] * 34 // 128  # Q8_0: 34 bytes per 32 weights instead of 128
    assert wq["dense"] < wf["dense"] / 3
    out = quant(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out).all()


def test_bench_quantizes_random_float_weights_slice_by_slice(monkeypatch):
    """random_weights="quantized" (megrez bench's default): every quantized tensor holds
    normal(0, 0.02) weights quantized in the recipe's type, drawn a slice of rows at a time
    (a tiny slice here), reproducible from the seed; "blocks" writes other (random) bytes."""
    from megrez import bench
    from megrez.quant import formats

    monkeypatch.setattr(formats, "C_CHUNK_WEIGHTS", 4096)
    cpu = torch.device("cpu")
    a = bench.random_model("megrez2-mini", cpu, torch.float32, quantization="q4_k_m")
    again = bench.random_model("megrez2-mini", cpu, torch.float32, quantization="q4_k_m")
    blocks = bench.random_model("megrez2-mini", cpu, torch.float32, quantization="q4_k_m", random_weights="blocks")
    qa, qb, qc = quant_tensors(a), quant_tensors(again), quant_tensors(blocks)
    from megrez.models import build_model
    from megrez.presets import PRESETS

    with torch.device("meta"):
        types = tensor_types(build_model(dict(PRESETS["megrez2-mini"])), "q4_k_m")
    assert {n: qt.qtype for n, qt in qa.items()} == types
    for name, qt in qa.items():
        assert torch.equal(qt.data, qb[name].data), name
        assert not torch.equal(qt.data, qc[name].data), name
        w = qt.dequantize()
        assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002, name
    assert torch.isfinite(a(torch.tensor([[1, 2, 3]]))).all()
    with pytest.raises(ValueError, match="random_weights must be one of"):
        bench.random_model("megrez2-mini", cpu, torch.float32, quantization="q8_0", random_weights="floats")


@pytest.mark.slow
def test_bench_random_quantized_model_never_holds_the_float_model():
    """megrez2-350m at q4_k_m (348M weights: 1.4 GB in float32, ~0.2 GB quantized) built with
    random float weights quantized slice by slice: peak RSS grows by about the quantized size."""
    code = ("import resource, torch\n"
            "from megrez.bench import random_model, quantized_weight_bytes\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "m = random_model('megrez2-350m', torch.device('cpu'), torch.float32, quantization='q4_k_m')\n"
            "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024\n"
            "print(grew, quantized_weight_bytes(m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    grew, qbytes = int(out[0]), int(out[1])
    assert 150e6 < qbytes < 300e6
    assert grew < qbytes + 100e6, f"peak RSS grew {grew / 1e6:.0f} MB for {qbytes / 1e6:.0f} MB of weights"
