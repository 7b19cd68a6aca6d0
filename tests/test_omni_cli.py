"""Megrez-3B-Omni from the command line, the checkpoint format, and the image adapter."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from megrez.cli import main
from megrez.loading import CheckpointError, load_model

PIL = pytest.importorskip("PIL.Image")


def run_chat(model, stdin: str, *args):
    return subprocess.run([sys.executable, "-m", "megrez.cli", "chat", "--model", str(model), "--max-tokens", "3",
                           "-t", "0", "--threads", "1", *args], input=stdin, capture_output=True, text=True,
                          timeout=600)


def test_create_tiny_omni_writes_the_official_layout(tiny_omni):
    config = json.loads((tiny_omni / "config.json").read_text())
    assert config["architectures"] == ["MegrezO"] and config["model_type"] == "megrezo"
    assert {"vision_config", "audio_config", "query_num"} <= set(config)
    with safe_open(str(tiny_omni / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight", "llm.model.norm.weight",
                 "vision.vpm.embeddings.patch_embedding.weight", "vision.vpm.embeddings.position_embedding.weight",
                 "vision.vpm.encoder.layers.0.self_attn.q_proj.bias", "vision.vpm.post_layernorm.weight",
                 "vision.resampler.query", "vision.resampler.kv_proj.weight", "vision.resampler.attn.in_proj_weight",
                 "vision.resampler.attn.out_proj.bias", "vision.resampler.ln_post.weight", "vision.resampler.proj",
                 "audio.audio.conv1.weight", "audio.audio.positional_embedding", "audio.audio.blocks.0.attn.key.weight",
                 "audio.audio.blocks.0.mlp.0.weight", "audio.audio.ln_post.bias", "audio.audio.proj.weight",
                 "audio.audio.audio_bos_eos_token.weight"):
        assert name in names, name
    assert "audio.audio.blocks.0.attn.key.bias" not in names and "vision.resampler.kv_proj.bias" not in names
    assert not any("pos_embed" in n for n in names)  # the resampler's table is computed, not stored


def test_strict_loading_names_the_tensor(tiny_omni, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_omni, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd.pop("vision.resampler.proj")
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="vision.resampler.proj"):
        load_model(bad, device="cpu")
    config = json.loads((bad / "config.json").read_text())
    del config["audio_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing required key 'audio_config'"):
        load_model(bad, device="cpu")


@pytest.mark.slow
def test_chat_with_image_flag_and_in_chat_commands(tiny_omni, tmp_path):
    PIL.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "blue.png")
    r = run_chat(tiny_omni, "what is it?\n/image /no/such.png\n/image " + str(tmp_path / "blue.png") + "\nand now?\n",
                 "--image", str(tmp_path / "blue.png"), "-v")
    assert r.returncode == 0, r.stderr
    prompts = [int(line.split()[0][1:]) for line in r.stderr.splitlines() if "prompt tokens" in line]
    assert len(prompts) == 2 and prompts[1] > prompts[0]  # the second image joined the conversation
    assert "/image /no/such.png: no such file" in r.stderr


def test_image_on_a_text_only_model_is_a_cli_error(tiny_dense, tmp_path, capsys):
    PIL.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["chat", "--model", str(tiny_dense), "--image", str(tmp_path / "x.png")]) == 2
    assert "need a Megrez-3B-Omni checkpoint" in capsys.readouterr().err


def test_image_adapter_trains_and_exports_a_working_checkpoint(tiny_moe, tmp_path):
    from megrez import LLM, SamplingParams
    from megrez.train.image_adapter import AdapterConfig, train_adapter

    cfg = AdapterConfig(base=str(tiny_moe), out=str(tmp_path / "adapter"), steps=12, batch_size=4, lr=1e-2,
                        warmup_steps=2, eval_pictures=2, log_every=4, threads=1,
                        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "image_size": 112, "patch_size": 14})
    summary = train_adapter(cfg)
    losses = summary["losses"]
    assert sum(losses[-4:]) < sum(losses[:4])
    assert summary["questions"] == 4 and 0.0 <= summary["accuracy"] <= 1.0
    llm = LLM(summary["final"], device="cpu")
    assert llm.model.args.omni.llm_architecture == "MegrezMoeForCausalLM" and llm.model.audio is None
    import torch

    base = load_model(tiny_moe, device="cpu")
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.bfloat16().float())  # the export is bfloat16
        # The text model is untouched: the same logits on a text prompt (over the old vocabulary).
        ids = torch.tensor([[5, 6, 7, 8]])
        ours, theirs = llm.model(ids), base(ids)
        assert (ours[..., : theirs.shape[-1]] - theirs).abs().max().item() <= 1e-4
    PIL.new("RGB", (112, 112), (255, 0, 0)).save(tmp_path / "red.png")
    out = llm.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "red.png")},
                                                 {"type": "text", "text": "What colour is the shape?"}]}],
                   SamplingParams(max_tokens=3, temperature=0))
    assert out.prompt_tokens > cfg.query_num
    with pytest.raises(ValueError, match="no audio encoder"):
        llm.chat([{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "red.png")}]}])


TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "image_size": 112, "patch_size": 14}


def test_vision_pretraining_learns_to_tell_colours(tiny_moe):
    """Stage 1 of the recipe: the vision module alone, through linear heads, learns the
    pictures' colours (chance is 25%)."""
    import random

    import torch

    from megrez.train.image_adapter import AdapterConfig, build, pretrain_vision

    torch.manual_seed(0)

    cfg = AdapterConfig(base=str(tiny_moe), vision_steps=40, vision_batch_size=16, vision_lr=3e-3,
                        warmup_steps=4, log_every=20, vision=TINY_VISION)
    model, adapter, _, _ = build(cfg)
    got = pretrain_vision(adapter.vision, model.hf_config["hidden_size"], cfg, random.Random(0))
    assert got["vision_accuracy_colour"] >= 0.6, got


def test_image_adapter_with_host_training_updates_the_text_model(tiny_moe, tmp_path):
    """With host_lr > 0 the text model is fine-tuned too: its text logits change."""
    import torch

    from megrez.train.image_adapter import AdapterConfig, train_adapter

    cfg = AdapterConfig(base=str(tiny_moe), out=str(tmp_path / "adapter"), steps=3, batch_size=2, lr=1e-3,
                        host_lr=1e-2, vision_steps=2, vision_batch_size=2, warmup_steps=1, eval_pictures=1,
                        log_every=1, threads=1, export_dtype="float32", vision=TINY_VISION)
    summary = train_adapter(cfg)
    assert {"vision_accuracy_colour", "vision_accuracy_content"} <= set(summary)
    trained = load_model(summary["final"], device="cpu")
    base = load_model(tiny_moe, device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours, theirs = trained(ids), base(ids)
    assert (ours[..., : theirs.shape[-1]] - theirs).abs().max().item() > 1e-3


def test_tower_lr_zero_keeps_the_tower_as_stage_1_left_it(tiny_moe, tmp_path):
    """--tower-lr 0 freezes the SigLIP tower in stage 2 (what stage 1 taught it is kept) while
    the resampler trains; by default stage 2 trains the tower too."""
    import torch

    from megrez.train.image_adapter import AdapterConfig, build, train_adapter

    def change_of(tune):
        cfg = AdapterConfig(base=str(tiny_moe), out=str(tmp_path / f"adapter-{tune}"), steps=2, batch_size=2,
                            lr=1e-2, tower_lr=tune, host_lr=1e-3, warmup_steps=1, eval_pictures=1,
                            threads=1, export_dtype="float32", vision=TINY_VISION)
        start = build(cfg)[0].vision.state_dict()
        trained = load_model(train_adapter(cfg)["final"], device="cpu").vision.state_dict()
        change = {part: max((trained[k] - v).abs().max().item() for k, v in start.items() if k.startswith(part))
                  for part in ("vpm.", "resampler.")}
        return change["vpm."], change["resampler."]

    tower, resampler = change_of(0.0)
    assert tower == 0.0 and resampler > 1e-4
    tower, resampler = change_of(None)
    assert tower > 1e-4 and resampler > 1e-4


def test_the_language_model_runs_quantized_and_the_encoders_stay_float(tiny_omni):
    from megrez import LLM, SamplingParams
    from megrez.quant.formats import QuantTensor

    llm = LLM(tiny_omni, device="cpu", quantization="q8_0")
    layer = llm.model.llm.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.weight, QuantTensor) and isinstance(layer.mlp.down_proj.weight, QuantTensor)
    assert not isinstance(llm.model.vision.vpm.encoder.layers[0].self_attn.q_proj.weight, QuantTensor)
    assert not isinstance(llm.model.audio.audio.blocks[0].attn.query.weight, QuantTensor)
    out = llm.chat([{"role": "user", "content": [{"type": "image", "image": PIL.new("RGB", (50, 50))},
                                                 {"type": "text", "text": "hi"}]}],
                   SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 4


BUNDLED_OMNI = Path(__file__).resolve().parents[1] / "src" / "megrez" / "assets" / "megrez2-tiny-omni"


@pytest.mark.skipif(not (BUNDLED_OMNI / "config.json").is_file(), reason="no bundled omni model")
def test_bundled_omni_model_answers_about_a_picture_out_of_the_box(tmp_path):
    """`megrez chat --image` without --model uses the bundled omni model and answers about the
    picture; on fresh synthetic pictures it names colours, shapes and digits (the asset's
    README reports its held-out accuracy on more of them, at least 90%)."""
    import random

    from megrez import LLM, SamplingParams
    from megrez.train.synthetic_images import make_picture

    rng = random.Random(123)
    pics = [make_picture(rng) for _ in range(20)]
    shape = next(p for p in pics if p.kind == "shape")
    shape.image.save(tmp_path / "shape.png")
    r = subprocess.run([sys.executable, "-m", "megrez.cli", "chat", "--image", str(tmp_path / "shape.png"),
                        "-t", "0", "--max-tokens", "6", "--threads", "1"], input="What colour is the shape?\n",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].strip() == f"{shape.colour.capitalize()}.", r.stdout

    llm = LLM(BUNDLED_OMNI, device="cpu")
    asked = [(p, q, a) for p in pics for q, a in p.questions()]
    outs = llm.chat([[{"role": "user", "content": [{"type": "image", "image": p.image}, {"type": "text", "text": q}]}]
                     for p, q, _ in asked], SamplingParams(temperature=0, max_tokens=8))
    right = {"colour": [], "shape": [], "digit": []}
    for (p, q, a), o in zip(asked, outs):
        right["colour" if "colour" in q else p.kind].append(o.text.strip() == a)
    assert all(right.values())
    assert sum(map(sum, right.values())) >= 0.8 * len(asked), right
    assert all(sum(v) >= 0.6 * len(v) for v in right.values()), right


def test_adapter_loss_with_the_shared_prefix_equals_the_full_forward(tiny_moe, tmp_path):
    import random

    import torch

    from megrez.multimodal.prompt import PromptBuilder
    from megrez.tokenizer import Tokenizer
    from megrez.train.image_adapter import AdapterConfig, build, example, forward_loss, shared_prefix

    cfg = AdapterConfig(base=str(tiny_moe), query_num=4,
                        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "image_size": 112, "patch_size": 14})
    model, adapter, files, old = build(cfg)
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    tok = Tokenizer(tmp_path)
    rng = random.Random(0)
    batch = [example(rng, cfg, PromptBuilder(tok, cfg.query_num), tok) for _ in range(3)]
    head = batch[0][0].token_ids[: batch[0][0].runs[0][0] - 1]
    full = forward_loss(model, adapter, old, batch)
    full.backward()
    want = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    reused = forward_loss(model, adapter, old, batch, shared_prefix(model, adapter, old, head))
    reused.backward()
    assert abs(float(full) - float(reused)) <= 1e-5
    for g, p in zip(want, adapter.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)
