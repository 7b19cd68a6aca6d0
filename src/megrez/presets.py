"""Named model shapes, as Hugging Face ``config.json`` dictionaries: the released shapes (for
benchmarks with random weights and for training at full size) and smaller ones with the same
structure. Megrez2 presets keep the real model's structure: layer 0 dense, the MoE layers in
sharing groups of 3 with pre-gated routing, sigmoid scores with ``noaux_tc`` selection, shared
experts beside the routed ones. Training replaces ``vocab_size`` with its tokenizer's.

    megrez train pretrain --preset megrez2-tiny ...        (see ``megrez train presets``)
    megrez bench --shape megrez2-3x7b-a3b ...
"""
from __future__ import annotations

_MEGREZ2 = {
    "architectures": ["MegrezMoeForCausalLM"], "model_type": "megrez_moe",
    "hidden_act": "silu", "first_k_dense_replace": 1, "moe_layer_freq": 1, "experts_shared_frequency": 3,
    "pre_gate": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "ep_size": 1, "rope_scaling": None, "rms_norm_eps": 1e-6, "attention_bias": False,
    "tie_word_embeddings": False,
}
_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rope_scaling": None,
    "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
}

_SIGLIP_400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                "num_hidden_layers": 27, "num_attention_heads": 16, "num_channels": 3, "image_size": 980,
                "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_WHISPER_LARGE = {"n_mels": 128, "n_ctx": 1500, "n_state": 1280, "n_head": 20, "n_layer": 32, "output_dim": 2560,
                  "avg_pool": True, "add_audio_bos_eos_token": True}

PRESETS: dict[str, dict] = {
    # Unit tests and smoke runs: seconds on a CPU.
    "megrez2-test": {**_MEGREZ2, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
                     "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
                     "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                     "max_position_embeddings": 1024, "rope_theta": 10000.0},
    # Two sharing groups, grouped routing and several shared experts at test size:
    # `megrez create-tiny --arch moe` and the benchmark tests.
    "megrez2-mini": {**_MEGREZ2, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 192,
                     "moe_intermediate_size": 32, "num_hidden_layers": 7, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "n_routed_experts": 16, "num_experts_per_tok": 4,
                     "n_shared_experts": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                     "max_position_embeddings": 2048, "rope_theta": 1_000_000.0},
    # The model shipped in megrez/assets (runs/shipped_model.sh): ~8M stored, ~5M active.
    "megrez2-tiny": {**_MEGREZ2, "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 128,
                     "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "n_routed_experts": 16, "num_experts_per_tok": 2, "n_shared_experts": 1,
                     "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                     "max_position_embeddings": 1024, "rope_theta": 10000.0},
    # GPU throughput benchmarks (scripts/train_bench.py): ~215M stored, ~145M active with a 32K vocab.
    "megrez2-200m": {**_MEGREZ2, "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "moe_intermediate_size": 384,
                     "num_hidden_layers": 13, "num_attention_heads": 12, "num_key_value_heads": 4,
                     "n_routed_experts": 32, "num_experts_per_tok": 4, "n_shared_experts": 2,
                     "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                     "max_position_embeddings": 4096, "rope_theta": 1_000_000.0},
    # Megrez2's structure at 348M stored / 203M active parameters: decoding on CPUs and laptops.
    "megrez2-350m": {**_MEGREZ2, "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
                     "moe_intermediate_size": 256, "num_hidden_layers": 13, "num_attention_heads": 8,
                     "num_key_value_heads": 2, "head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6,
                     "n_shared_experts": 4, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                     "max_position_embeddings": 4096, "rope_theta": 1_000_000.0},
    # The released Megrez2-3x7B-A3B shape (7.5B stored, 3B active). The model card does not state
    # the KV heads (4 here; `megrez bench --kv-heads`), routing groups or scaling factor (plain
    # top-k, scale 1).
    "megrez2-3x7b-a3b": {**_MEGREZ2, "vocab_size": 128880, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                     "num_hidden_layers": 31, "num_attention_heads": 16, "num_key_value_heads": 4,
                     "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 4,
                     "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                     "max_position_embeddings": 32768, "rope_theta": 1_000_000.0},
    # Megrez-3B-Instruct (Llama).
    "megrez-3b": {**_LLAMA, "vocab_size": 122880, "hidden_size": 2560, "intermediate_size": 7168,
                  "num_hidden_layers": 32, "num_attention_heads": 40, "num_key_value_heads": 10,
                  "max_position_embeddings": 32768, "rope_theta": 5_000_000.0, "rms_norm_eps": 1e-5},
    # Megrez-3B-Omni (MegrezO): the Megrez-3B LLM at 4K context, SigLIP-400M navit, Whisper-large-v3 encoder.
    "megrez-3b-omni": {**_LLAMA, "architectures": ["MegrezO"], "model_type": "megrezo", "vocab_size": 122880,
                       "hidden_size": 2560, "intermediate_size": 7168, "num_hidden_layers": 32,
                       "num_attention_heads": 40, "num_key_value_heads": 10, "max_position_embeddings": 4096,
                       "rope_theta": 5_000_000.0, "rms_norm_eps": 1e-5, "query_num": 64, "patch_size": 14,
                       "vision_batch_size": 8, "drop_vision_last_layer": False,
                       "vision_config": _SIGLIP_400M, "audio_config": _WHISPER_LARGE},
    # Tests, and `megrez create-tiny --arch omni`: the same structure at test size.
    "megrezo-test": {**_LLAMA, "architectures": ["MegrezO"], "model_type": "megrezo", "vocab_size": 1024,
                     "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                     "rms_norm_eps": 1e-5, "query_num": 16, "patch_size": 14, "vision_batch_size": 8,
                     "drop_vision_last_layer": False,
                     "vision_config": {**_SIGLIP_400M, "hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 2, "num_attention_heads": 4},
                     "audio_config": {**_WHISPER_LARGE, "n_state": 64, "n_head": 4, "n_layer": 2, "output_dim": 256}},
    # Tests, and `megrez create-tiny --arch dense`.
    "llama-test": {**_LLAMA, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                   "rope_theta": 10000.0, "rms_norm_eps": 1e-5},
}


def preset_config(name: str, vocab_size: int, overrides: dict | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id, "torch_dtype": "float32", **(overrides or {})}
