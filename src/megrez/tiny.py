"""Small random checkpoints in the official Hugging Face format, with a small byte-level BPE
tokenizer that knows the Megrez special tokens: for trying the tools and for tests.

    megrez create-tiny tiny-moe --arch moe
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .loading import save_model
from .models import build_model
from .presets import PRESETS
from .tokenizer import MEGREZ_CHAT_TEMPLATE, MEGREZ_SPECIAL_TOKENS

# The placeholder and delimiter tokens of Megrez-3B-Omni prompts (megrez.multimodal.prompt).
OMNI_SPECIAL_TOKENS = ["<|unk|>", "<image>", "</image>", "<slice>", "</slice>", "<audio>", "</audio>"]

# A fixed bilingual text, so the tokenizer (and thus every tiny checkpoint) is the same on
# every machine.
TOKENIZER_CORPUS = """\
Megrez is a family of language models for devices. Megrez2 is a mixture-of-experts model:
every three consecutive layers share one pool of experts, and each layer's router reads the
previous layer's hidden state, so the engine knows which experts a layer needs one layer early.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2025. Code: def main(): return print("hi") if x else None
In the beginning was the Word, and the Word was with God. Let there be light: and there was light.
The model loads checkpoints, tokenizes text, renders the chat template and streams the answer.
Question: what is the capital of France? Answer: Paris. Please reason step by step.
床前明月光，疑是地上霜。举头望明月，低头思故乡。
白日依山尽，黄河入海流。欲穷千里目，更上一层楼。
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
你好，世界！今天天气很好。我们一起学习人工智能和语言模型。
你是Megrez-3B-Instruct，将针对用户的问题给出详细的、积极的回答。
大语言模型可以回答问题、写代码、翻译文本，也可以在手机和电脑上运行。
混合专家模型把计算分给不同的专家，每个词元只使用其中几个专家。
"""

# The shapes of `megrez create-tiny --arch moe|dense` (see megrez.presets).
TINY_PRESETS = {"moe": "megrez2-mini", "dense": "llama-test", "omni": "megrezo-test"}


def train_tokenizer(corpus: list[str], vocab_size: int, special_tokens: list[str] | None = None):
    """A byte-level BPE (any UTF-8 text round-trips) with the Megrez special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens or MEGREZ_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def tokenizer_files(tok, model_max_length: int, special_tokens: list[str] | None = None) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json contents."""
    eos, turn_end = tok.token_to_id("<|eos|>"), tok.token_to_id("<|turn_end|>")
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False}
             for t in special_tokens or MEGREZ_SPECIAL_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
        "eos_token": "<|turn_end|>", "pad_token": "<|eos|>", "bos_token": None,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
        "chat_template": MEGREZ_CHAT_TEMPLATE,
    }
    generation_config = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256,
                         "eos_token_id": [turn_end, eos], "pad_token_id": eos}
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
        "generation_config.json": json.dumps(generation_config, indent=2) + "\n",
    }


def create_tiny(out: str | Path, arch: str = "moe", seed: int = 0, vocab_size: int = 1024,
                overrides: dict | None = None, tokenizer_corpus: list[str] | None = None) -> Path:
    """Write a random checkpoint of the tiny ``arch`` shape (``overrides`` change config keys)."""
    if arch not in TINY_PRESETS:
        raise ValueError(f"arch must be one of {', '.join(TINY_PRESETS)}, got {arch!r}")
    special = MEGREZ_SPECIAL_TOKENS + (OMNI_SPECIAL_TOKENS if arch == "omni" else [])
    tok = train_tokenizer(tokenizer_corpus or TOKENIZER_CORPUS.splitlines(), vocab_size, special)
    eos, turn_end = tok.token_to_id("<|eos|>"), tok.token_to_id("<|turn_end|>")
    config = {**PRESETS[TINY_PRESETS[arch]], "vocab_size": tok.get_vocab_size(), "bos_token_id": None,
              "eos_token_id": turn_end, "pad_token_id": eos, "torch_dtype": "float32", **(overrides or {})}
    model = build_model(config)
    gen = torch.Generator().manual_seed(seed)
    model.init_weights(std=0.08, generator=gen)
    with torch.no_grad():
        # Random weights are near zero; larger norms and routers make every part of the model
        # matter to the logits, and a non-zero correction bias makes the bias rules testable.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    model.hf_config = config
    return save_model(model, out, dtype=torch.float32,
                      extra_files=tokenizer_files(tok, config["max_position_embeddings"], special))
