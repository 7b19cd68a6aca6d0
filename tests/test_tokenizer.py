"""Chat templates and streaming detokenisation."""
import json
import shutil

import pytest

from megrez.tokenizer import Tokenizer, TokenizerError

MIXED = "Megrez2 是一个混合专家模型 (MoE)，它在手机上运行得很快。Hello 世界! 🚀 数学：3.14 ≈ π"


@pytest.fixture
def tok(tiny_moe):
    return Tokenizer(tiny_moe)


def test_megrez_chat_format(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}])
    assert text == ("<|role_start|>system<|role_end|>你是Megrez-3B-Instruct，将针对用户的问题给出详细的、积极的回答。"
                    "<|turn_end|><|role_start|>user<|role_end|>你好<|turn_end|><|role_start|>assistant<|role_end|>")
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}], add_generation_prompt=False)
    assert text == ("<|role_start|>system<|role_end|>S<|turn_end|><|role_start|>user<|role_end|>Q<|turn_end|>"
                    "<|role_start|>assistant<|role_end|>A<|turn_end|>")


def test_special_tokens_encode_as_single_ids(tok):
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    for special in ("<|role_start|>", "<|role_end|>", "<|turn_end|>"):
        assert tok.token_to_id(special) in ids
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|role_start|>system<|role_end|>")


def test_content_as_text_parts(tok):
    parts = [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == \
        tok.apply_chat_template([{"role": "user", "content": "你好"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: only text parts"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ValueError, match=r"messages\[1\].role"):
        tok.apply_chat_template([{"role": "user", "content": "x"}, {"content": "y"}])


def test_checkpoint_template_wins_and_fallback(tiny_moe, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tiny_moe, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}" \
                           "{% if add_generation_prompt %}[assistant]{% endif %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x[assistant]"
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer(d)
    assert t.chat_template_source == "built-in Megrez format"
    assert t.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<|role_start|>assistant<|role_end|>")
    cfg["chat_template"] = "{% for m in messages %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat_template is not a valid jinja2 template"):
        Tokenizer(d)


def test_template_can_raise(tiny_moe, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tiny_moe, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="roles must alternate"):
        Tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])


def test_streaming_detokenisation_is_byte_exact(tok):
    ids = tok.encode(MIXED)
    # The small tokenizer splits most Chinese characters and the emoji over several tokens.
    assert len(ids) > len(MIXED) // 2
    detok = tok.detokenizer()
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == MIXED == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    held = sum(1 for d in deltas[:-1] if d == "")
    assert held > 0, "no token ended inside a multi-byte character: the test would not test holding back"


def test_stop_tokens_include_turn_end_despite_misspelt_eos(tiny_moe, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tiny_moe, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|turn_end>"  # as in the Megrez-3B-Instruct release
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").unlink()
    model_cfg = json.loads((d / "config.json").read_text())
    model_cfg["eos_token_id"] = None
    (d / "config.json").write_text(json.dumps(model_cfg))
    t = Tokenizer(d)
    assert t.token_to_id("<|turn_end|>") in t.stop_token_ids


def test_missing_or_broken_tokenizer(tiny_moe, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tiny_moe, d)
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        Tokenizer(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json: file not found"):
        Tokenizer(d)
