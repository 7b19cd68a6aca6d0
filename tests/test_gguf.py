"""GGUF in and out: files we write load back to identical tensors and greedy tokens (Llama as
llama.cpp's converter writes it, Megrez2 as ``megrez-moe``); bad files get errors naming the
file and tensor. With llama-cpp-python installed, llama.cpp gives the same greedy tokens."""

import numpy as np
import pytest
import torch

from megrez import LLM, SamplingParams
from megrez.cli import main
from megrez.loading import CheckpointError, load_model
from megrez.loading.gguf import GGUFCheckpoint, rope_permute, rope_unpermute
from megrez.quant.modules import quant_tensors
from megrez.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = [5, 77, 300, 12, 640, 9, 81]


def quantize_cli(src, out, qtype):
    assert main(["quantize", str(src), str(out), "--type", qtype]) == 0
    return out


def fields(path):
    r = gguf.GGUFReader(str(path))

    def value(key):
        f = r.fields[key]
        if len(f.data) > 1 or f.types[0] == gguf.GGUFValueType.ARRAY:
            return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i].item()
                    for i in f.data]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.item()

    return r, value


def test_rope_permutation_round_trips_and_pairs_rotate_half_halves():
    w = torch.arange(4 * 8 * 3).reshape(4 * 8, 3)  # 4 heads of dim 8
    p = rope_permute(w, 4)
    assert torch.equal(rope_unpermute(p, 4), w)
    # Head 0: rows (0, 4), (1, 5), ... become adjacent.
    assert p[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_k_m"])
def test_llama_gguf_round_trip(tiny_dense, tmp_path, qtype):
    out = quantize_cli(tiny_dense, tmp_path / f"m-{qtype}.gguf", qtype)
    quant = None if qtype == "f32" else qtype
    want = load_model(tiny_dense, device="cpu", quantization=quant)
    got = load_model(out, device="cpu")
    sw, sg = want.state_dict(), got.state_dict()
    assert sw.keys() == sg.keys() and all(torch.equal(sw[k], sg[k]) for k in sw)
    qw, qg = quant_tensors(want), quant_tensors(got)
    assert qw.keys() == qg.keys()
    assert all(qw[k].qtype == qg[k].qtype and torch.equal(qw[k].data, qg[k].data) for k in qw)
    a = LLM(tiny_dense, device="cpu", quantization=quant, max_num_seqs=1).generate(PROMPT, GREEDY).token_ids
    b = LLM(out, device="cpu", max_num_seqs=1).generate(PROMPT, GREEDY).token_ids
    assert a == b


def test_llama_gguf_is_what_llama_cpp_writes(tiny_dense, tmp_path):
    out = quantize_cli(tiny_dense, tmp_path / "m.gguf", "f32")
    r, value = fields(out)
    names = [t.name for t in r.tensors]
    assert value("general.architecture") == "llama"
    assert names[0] == "token_embd.weight" and "output_norm.weight" in names and "output.weight" in names
    for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"):
        assert f"blk.3.{part}.weight" in names
    model = load_model(tiny_dense, device="cpu")
    a = model.args
    assert value("llama.block_count") == a.num_hidden_layers
    assert value("llama.embedding_length") == a.hidden_size
    assert value("llama.attention.head_count_kv") == a.num_key_value_heads
    assert value("llama.rope.dimension_count") == a.head_dim
    # Q and K rows in llama.cpp's RoPE order; everything else as in the checkpoint.
    tensors = {t.name: t for t in r.tensors}
    q = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data))
    k = torch.from_numpy(np.array(tensors["blk.1.attn_k.weight"].data))
    layer = model.layers[1].self_attn
    assert torch.equal(q, rope_permute(layer.q_proj.weight, a.num_attention_heads))
    assert torch.equal(k, rope_permute(layer.k_proj.weight, a.num_key_value_heads))
    assert torch.equal(torch.from_numpy(np.array(tensors["blk.1.attn_v.weight"].data)), layer.v_proj.weight)
    # The tokenizer as tokenizer.ggml metadata.
    tok = Tokenizer(tiny_dense)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "megrez"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == a.vocab_size and tokens[tok.encode("<|turn_end|>")[0]] == "<|turn_end|>"
    types = value("tokenizer.ggml.token_type")
    assert types[tokens.index("<|role_start|>")] == 3 and types[tokens.index("a")] == 1
    assert value("tokenizer.ggml.eot_token_id") == tokens.index("<|turn_end|>")
    assert value("tokenizer.ggml.eos_token_id") == tokens.index("<|turn_end|>")
    assert "<|role_start|>" in value("tokenizer.chat_template")
    assert len(value("tokenizer.ggml.merges")) > 100


def test_gguf_tokenizer_and_chat_template_round_trip(tiny_dense, tmp_path):
    out = quantize_cli(tiny_dense, tmp_path / "m.gguf", "q8_0")
    ours = Tokenizer(tiny_dense)
    theirs = LLM(out, device="cpu", max_num_seqs=1).tokenizer
    text = "Hello, world! 你好，世界。 <|role_start|>user<|role_end|>"
    assert theirs.encode(text) == ours.encode(text)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert theirs.encode_chat(chat) == ours.encode_chat(chat)


def test_gguf_rebuilt_tokenizer_from_standard_keys(tiny_dense, tmp_path):
    """A file from another tool has only tokenizer.ggml.* keys: the BPE is rebuilt from them."""
    out = quantize_cli(tiny_dense, tmp_path / "m.gguf", "q8_0")
    ckpt = GGUFCheckpoint(out)
    ckpt._string = lambda key, default=None, _orig=ckpt._string: default if key.startswith("megrez.") \
        else _orig(key, default)
    files = ckpt.tokenizer_files()
    d = tmp_path / "tok"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    text = "The quick brown fox jumps over the lazy dog. 你好 <|turn_end|>"
    assert Tokenizer(d).encode(text) == Tokenizer(tiny_dense).encode(text)
    assert ckpt._config()["num_hidden_layers"] == 4


@pytest.mark.parametrize("qtype", ["q4_k_m", "bf16"])
def test_megrez_moe_gguf_round_trip(tiny_moe, tmp_path, qtype):
    out = quantize_cli(tiny_moe, tmp_path / f"moe-{qtype}.gguf", qtype)
    r, value = fields(out)
    names = {t.name for t in r.tensors}
    assert value("general.architecture") == "megrez-moe"
    model = load_model(tiny_moe, device="cpu")
    a = model.args
    owners = sorted({a.owner(i) for i in range(a.num_hidden_layers) if a.is_moe(i)})
    assert owners == [1, 4]
    for i in range(a.num_hidden_layers):
        assert (f"blk.{i}.ffn_gate_exps.weight" in names) == (i in owners)
        if a.is_moe(i):
            for n in ("ffn_gate_inp.weight", "ffn_exp_probs_b.bias", "ffn_up_shexp.weight", "ffn_down_shexp.weight"):
                assert f"blk.{i}.{n}" in names
    assert "blk.0.ffn_down.weight" in names
    assert value("megrez-moe.expert_count") == a.n_routed_experts
    assert value("megrez-moe.expert_used_count") == a.num_experts_per_tok
    assert value("megrez-moe.expert_shared_count") == a.n_shared_experts
    assert value("megrez-moe.leading_dense_block_count") == a.first_k_dense_replace
    assert value("megrez-moe.expert_feed_forward_length") == a.moe_intermediate_size
    assert value("megrez-moe.expert_shared_frequency") == a.experts_shared_frequency
    assert value("megrez-moe.expert_group_count") == a.n_group
    assert value("megrez-moe.expert_weights_scale") == pytest.approx(a.routed_scaling_factor)
    tensors = {t.name: t for t in r.tensors}
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    got = load_model(out, device="cpu")
    if qtype == "q4_k_m":
        want = load_model(tiny_moe, device="cpu", quantization=qtype)
        qw, qg = quant_tensors(want), quant_tensors(got)
        assert qw.keys() == qg.keys() and all(torch.equal(qw[k].data, qg[k].data) for k in qw)
    else:
        want = load_model(tiny_moe, device="cpu")
        with torch.no_grad():  # what bf16 storage keeps of each weight
            for n, p in want.named_parameters():
                if p.dim() >= 2 and not n.endswith("mlp.gate.weight"):
                    p.copy_(p.to(torch.bfloat16))
    sw, sg = want.state_dict(), got.state_dict()
    assert sw.keys() == sg.keys() and all(torch.equal(sw[k], sg[k]) for k in sw)
    # The routing settings come back from the file alone.
    config = GGUFCheckpoint(out)
    config._string = lambda key, default=None, _orig=config._string: default if key == "megrez.config" \
        else _orig(key, default)
    derived = config._config()
    from megrez.models import build_model

    with torch.device("meta"):
        rebuilt = build_model(derived).args.to_dict()
    assert rebuilt == a.to_dict()
    if qtype == "q4_k_m":
        x = LLM(tiny_moe, device="cpu", quantization=qtype, max_num_seqs=1).generate(PROMPT, GREEDY).token_ids
        y = LLM(out, device="cpu", max_num_seqs=1).generate(PROMPT, GREEDY).token_ids
        assert x == y


# ------------------------------------------------------------------------------ bad files

@pytest.fixture(scope="module")
def good_file(tiny_dense, tmp_path_factory):
    return quantize_cli(tiny_dense, tmp_path_factory.mktemp("g") / "m.gguf", "q8_0")


def test_truncated_file_is_refused(good_file, tmp_path):
    bad = tmp_path / "cut.gguf"
    data = good_file.read_bytes()
    bad.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*(truncated|not a readable)"):
        load_model(bad)
    bad.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: not a readable GGUF file"):
        load_model(bad)


def write_variant(src, out, arch=None, drop=None, retype=None):
    """A copy of GGUF ``src`` with another architecture, a tensor left out, or one tensor stored in
    another type."""
    r = gguf.GGUFReader(str(src))
    old_arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(out), arch or old_arch)
    for t in r.tensors:
        if t.name == drop:
            continue
        data = np.array(t.data)
        if t.name == retype:
            k = int(t.shape[0])
            blocks = np.zeros((int(t.shape[1]), k // 256 * 176), dtype=np.uint8)  # Q5_K bytes
            w.add_tensor(t.name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q5_K)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    for key in ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.context_length"):
        f = r.fields[key]
        w.add_uint32(key.replace("llama.", f"{arch or old_arch}.", 1), int(f.parts[f.data[0]][0]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_unknown_architecture_is_refused(good_file, tmp_path):
    bad = write_variant(good_file, tmp_path / "arch.gguf", arch="qwen2")
    with pytest.raises(CheckpointError, match=r"arch\.gguf: unsupported GGUF architecture 'qwen2'"):
        load_model(bad)


def test_missing_tensor_is_refused(good_file, tmp_path):
    bad = write_variant(good_file, tmp_path / "missing.gguf", drop="blk.2.attn_k.weight")
    with pytest.raises(CheckpointError, match=r"missing\.gguf: checkpoint is missing 1 tensor.*layers\.2\.self_attn\.k_proj"):
        load_model(bad)


def test_unsupported_tensor_type_is_refused(tiny_dense, tmp_path):
    src = quantize_cli(tiny_dense, tmp_path / "m.gguf", "f32")
    bad = write_variant(src, tmp_path / "q5k.gguf", retype="blk.1.ffn_up.weight")
    with pytest.raises(CheckpointError, match=r"q5k\.gguf: tensor 'blk\.1\.ffn_up\.weight' has type Q5_K"):
        load_model(bad)


def test_interrupted_write_leaves_nothing(tiny_dense, tmp_path, monkeypatch):
    def crash(self, tensor, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", crash)
    assert main(["quantize", str(tiny_dense), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_quantize_refuses_existing_output_and_bad_names(tiny_dense, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert main(["quantize", str(tiny_dense), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 2
    assert main(["quantize", str(tiny_dense), str(tmp_path / "m.bin"), "--type", "q8_0"]) == 2
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt-ids", "1"]) == 2


# ------------------------------------------------------------------------------ llama.cpp as the oracle

@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_k_m"])
def test_llama_cpp_gives_the_same_greedy_tokens(tiny_dense, tmp_path, qtype):
    """llama.cpp (llama-cpp-python) reads a file we wrote and predicts what we predict: the same
    greedy tokens and, position by position, logits equal within float32 summation error."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = quantize_cli(tiny_dense, tmp_path / f"m-{qtype}.gguf", qtype)
    ours_llm = LLM(out, device="cpu", max_num_seqs=1)
    ours = ours_llm.generate(PROMPT, GREEDY).token_ids
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    llm.eval(list(PROMPT) + ours)
    theirs_logits = torch.tensor(np.array(llm.scores[: len(PROMPT) + len(ours)]))
    theirs = theirs_logits[len(PROMPT) - 1:-1].argmax(-1).tolist()
    assert theirs == ours
    with torch.no_grad():
        mine = ours_llm.model(torch.tensor([list(PROMPT) + ours]))[0]
    # llama.cpp quantizes activations to 8 bits for quantized weights: compare at that precision.
    tol = 1e-3 if qtype == "f32" else 5e-2
    assert (mine - theirs_logits).abs().max() <= tol * mine.abs().max()
