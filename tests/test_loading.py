"""Checkpoint loading and saving: round trips, sharding, and a clear error for every fault."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megrez.loading import CheckpointError, load_model, resolve_model_path, save_model
from megrez.models import ConfigError

IDS = torch.tensor([[5, 77, 300, 12, 640]])


@pytest.fixture
def ckpt(tiny_moe, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_moe, dst)
    return dst


def rewrite_weights(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_sharded_save_round_trip(tiny_moe, tmp_path):
    model = load_model(tiny_moe)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=300_000, copy_from=tiny_moe)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file()
    again = load_model(out)
    assert torch.equal(again(IDS), model(IDS))
    # Experts are written per expert, under the owner layer only, as in the official files.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in index
    assert not any(k.startswith("model.layers.2.mlp.experts.") for k in index)


def test_save_bfloat16_keeps_router_bias_float32(tiny_moe, tmp_path):
    out = save_model(load_model(tiny_moe), tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(out, dtype="float32")(IDS).isfinite().all()


def test_missing_tensor(ckpt):
    rewrite_weights(ckpt, lambda t: t.pop("model.layers.3.mlp.shared_experts.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*'model\.layers\.3\.mlp\.shared_experts\.up_proj\.weight'"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_model(ckpt)


def test_experts_on_a_non_owner_layer_are_explained(ckpt):
    def add(t):
        t["model.layers.2.mlp.experts.0.gate_proj.weight"] = t["model.layers.1.mlp.experts.0.gate_proj.weight"].clone()
    rewrite_weights(ckpt, add)
    with pytest.raises(CheckpointError, match="layer 2 shares the routed experts of layer 1"):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.2.self_attn.q_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.q_proj\.weight' has shape \[64, 32\], "
                                              r"expected \[64, 64\]"):
        load_model(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(ckpt)


def test_corrupt_header(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(ckpt)


def test_missing_shard(tiny_moe, tmp_path):
    out = save_model(load_model(tiny_moe), tmp_path / "sharded", max_shard_bytes=300_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in model.safetensors.index.json is missing"):
        load_model(out)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no safetensors weights.*pytorch_model.bin"):
        load_model(ckpt)


@pytest.mark.parametrize("key,value,message", [
    ("hidden_act", "gelu", "'hidden_act': 'gelu'"),
    ("scoring_func", "relu", "'scoring_func': 'relu'"),
    ("topk_method", "random", "'topk_method': 'random'"),
    ("n_group", 5, "'n_group': 5"),
    ("moe_layer_freq", 2, "'moe_layer_freq': 2"),
    ("num_key_value_heads", 3, "'num_key_value_heads': 3"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4}, "'rope_scaling'"),
    ("num_experts_per_tok", 99, "'num_experts_per_tok': 99"),
    ("architectures", ["GPT2LMHeadModel"], "'architectures'"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "'quantization_config': quant_method 'gptq'"),
])
def test_unsupported_config_value_names_the_key(ckpt, key, value, message):
    edit_config(ckpt, **{key: value})
    with pytest.raises(ConfigError, match=f"config.json: unsupported value for {message}".replace("[", r"\[")):
        load_model(ckpt)


def test_missing_config_key_and_bad_json(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing required key.*'hidden_size'"):
        load_model(ckpt)
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(ckpt)


def test_extra_config_keys_are_ignored(ckpt):
    edit_config(ckpt, some_future_key=123, auto_map={"AutoModel": "x.y"})
    assert load_model(ckpt)(IDS).shape[-1] > 0


def test_paths_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_model_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_model_path(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache, and the download failed"):
        resolve_model_path("Infinigence/Megrez2-3x7B-A3B")


def test_interrupted_save_leaves_nothing(tiny_moe, tmp_path, monkeypatch):
    import megrez.loading.safetensors as loading

    model = load_model(tiny_moe)
    save_model(model, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before  # old checkpoint intact


@pytest.mark.slow
def test_peak_host_memory_stays_near_model_size(tmp_path):
    """Load a ~130 MB checkpoint in a fresh process: peak RSS grows by about one model, not two."""
    import subprocess
    import sys

    from megrez.tiny import create_tiny

    path = create_tiny(tmp_path / "big", "moe", overrides=dict(
        hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_attention_heads=8,
        num_key_value_heads=2, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4))
    size = (path / "model.safetensors").stat().st_size
    code = ("import resource, torch, megrez.loading as L\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"m = L.load_model({str(path)!r}, progress=False)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)")
    grew = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert size > 100e6
    assert grew < 1.3 * size, f"peak RSS grew {grew / size:.2f}x the checkpoint size"


def test_auto_dtype_on_cpu_falls_back_to_16_bit_only_when_float32_cannot_fit(tiny_moe, tmp_path, monkeypatch, capsys):
    import megrez.loading.model as loading

    d = tmp_path / "bf16"
    save_model(load_model(tiny_moe), d, dtype=torch.bfloat16, copy_from=tiny_moe)
    assert load_model(d).lm_head.weight.dtype == torch.float32  # plenty of memory: exact float32
    monkeypatch.setattr(loading, "available_host_memory", lambda: 1 << 20)
    model = load_model(d)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert "would not fit in the available memory" in capsys.readouterr().err
    assert load_model(d, dtype="float32").lm_head.weight.dtype == torch.float32  # asked for: obeyed
