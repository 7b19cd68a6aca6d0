"""GGUF files (llama.cpp's format), read and written with the ``gguf`` package.

Llama models (Megrez-3B) are written as llama.cpp's ``convert_hf_to_gguf.py`` writes them, so
llama.cpp reads our files and we read its: architecture ``llama``, llama.cpp's tensor names,
the Q and K rows permuted for its RoPE layout (undone on load), the tokenizer as
``tokenizer.ggml.*`` metadata (``gpt2`` BPE, pre-tokenizer ``megrez``) and the chat template.
Megrez2 is written as architecture ``megrez-moe`` with llama.cpp's MoE tensor names (experts
stacked ``ffn_{gate,up,down}_exps`` on the owner layers of each sharing group, ``_shexp`` for
shared experts, ``ffn_gate_inp`` and ``ffn_exp_probs_b`` for the router) and DeepSeek-style
metadata, plus the sharing frequency and routing settings so the file describes itself.

Both also carry ``megrez.config`` (the Hugging Face config.json) and ``megrez.tokenizer.json``
(the exact tokenizer), which other tools ignore; files without them are rebuilt from the
standard keys. Errors are :class:`CheckpointError` s naming the file and the tensor or key.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
from pathlib import Path

import numpy as np
import torch

from .common import CheckpointError

ARCHES = {"llama": "llama", "megrez_moe": "megrez-moe"}  # our model module -> GGUF architecture
HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "megrez-moe": ("MegrezMoeForCausalLM", "megrez_moe")}

GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "ffn_exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.experts.gate_proj": "ffn_gate_exps.weight", "mlp.experts.up_proj": "ffn_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
GGUF_ALIASES = {"exp_probs_b.bias": "ffn_exp_probs_b.bias"}  # llama.cpp's generic name for the bias
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
FLOAT_TYPES = (0, 1, 30)  # F32, F16, BF16

# token types of tokenizer.ggml.token_type
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_name(ours: str) -> str:
    if ours in GLOBAL_NAMES:
        return GLOBAL_NAMES[ours]
    m = LAYER.match(ours)
    if m is None or m.group(2) not in LAYER_NAMES:
        raise KeyError(ours)
    return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"


def our_name(name: str) -> str | None:
    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    m = re.match(r"blk\.(\d+)\.(.+)$", name)
    if m is None:
        return None
    rest = GGUF_ALIASES.get(m.group(2), m.group(2))
    layer = {v: k for k, v in LAYER_NAMES.items()}.get(rest)
    return None if layer is None else f"model.layers.{m.group(1)}.{layer}"


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter order of Q/K rows: within each head, rotate-half pairs (i, i + d/2)
    become adjacent (i, i+1). Works on any per-row data (float rows or quantized row bytes)."""
    n = rows.shape[0]
    return rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def rope_unpermute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    n = rows.shape[0]
    return rows.reshape(n_head, n // n_head // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


# ------------------------------------------------------------------------------ writing

def write_gguf(model, out: str | os.PathLike, scheme: str, tokenizer_dir: str | os.PathLike | None,
               progress: bool | None = None, name: str | None = None) -> Path:
    """Write ``model`` (float, or quantized by ``scheme``; float weights are converted tensor by
    tensor for the float schemes) to ``out`` atomically: nothing appears at ``out`` unless the
    whole file was written."""
    import gguf
    from tqdm import tqdm

    from ..quant.formats import QType, quantize, row_bytes
    from ..quant.modules import quant_tensors
    from ..quant.recipe import SCHEMES, tensor_type

    out = Path(out)
    module = type(model).__module__.rsplit(".", 1)[-1]
    arch = ARCHES.get(module)
    if arch is None:
        raise ValueError(f"GGUF export supports Llama and Megrez2 models, not {module}")
    args = model.args
    qts = quant_tensors(model)
    sources = dict(model.named_parameters())
    sources.update(model.named_buffers())
    float_type = SCHEMES[scheme] if scheme in ("f16", "bf16", "f32") else QType.F32
    tied = bool(getattr(args, "tie_word_embeddings", False))
    plan = []  # (gguf name, our name, qtype, logical shape)
    for ours in _tensor_order(model):
        if tied and ours == "lm_head.weight":
            continue
        if ours in qts:
            qt = qts[ours]
            plan.append((gguf_name(ours), ours, qt.qtype, qt.shape))
            continue
        t = sources[ours]
        qtype = QType.F32
        if t.dim() >= 2 and float_type != QType.F32:
            want = tensor_type(ours, tuple(t.shape), scheme, args.num_hidden_layers, tied)
            qtype = want if want is not None else QType.F32
        plan.append((gguf_name(ours), ours, qtype, tuple(t.shape)))

    def data(ours: str, qtype: QType) -> torch.Tensor:
        if ours in qts:
            rows = qts[ours].data
        else:
            t = sources[ours].detach().to("cpu", torch.float32)
            rows = t.contiguous().view(torch.uint8) if qtype == QType.F32 else quantize(t, qtype).data
        if arch == "llama" and ours.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = args.num_attention_heads if ".q_proj." in ours else args.num_key_value_heads
            rows = rope_permute(rows, heads)
        return rows.contiguous()

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_metadata(writer, model, arch, scheme, name or out.stem)
        _write_tokenizer(writer, tokenizer_dir, args.vocab_size)
        total = 0
        for gname, _, qtype, shape in plan:
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes(qtype, shape[-1])
            total += nbytes
            writer.add_tensor_info(gname, (*shape[:-1], row_bytes(qtype, shape[-1])), np.dtype(np.uint8), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        show = progress if progress is not None else total > (64 << 20)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not show) as bar:
            for gname, ours, qtype, _ in plan:
                rows = data(ours, qtype)
                writer.write_tensor_data(rows.numpy())
                bar.update(rows.numel())
                del rows
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        if tmp.exists():
            tmp.unlink()
        raise
    return out


def _tensor_order(model) -> list[str]:
    """Our tensor names in llama.cpp's order: embedding, layers, final norm, output."""
    from ..quant.modules import quant_tensors

    names = list(dict(model.named_parameters())) + list(dict(model.named_buffers()))
    names += [n for n in quant_tensors(model) if n not in names]
    layer = lambda n: int(LAYER.match(n).group(1)) if LAYER.match(n) else -1  # noqa: E731
    head = [n for n in ("model.embed_tokens.weight",) if n in names]
    tail = [n for n in ("model.norm.weight", "lm_head.weight") if n in names]
    body = sorted((n for n in names if LAYER.match(n)), key=layer)
    return head + body + tail


def _write_metadata(w, model, arch: str, scheme: str, name: str) -> None:
    import gguf

    from ..loading.safetensors import model_config

    a = model.args
    w.add_name(name)
    w.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "bf16": 32}[scheme])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_block_count(a.num_hidden_layers)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.num_attention_heads)
    w.add_head_count_kv(a.num_key_value_heads)
    w.add_rope_freq_base(float(a.rope_theta))
    w.add_layer_norm_rms_eps(float(a.rms_norm_eps))
    w.add_vocab_size(a.vocab_size)
    w.add_rope_dimension_count(a.head_dim)
    if a.head_dim * a.num_attention_heads != a.hidden_size:
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
    rs = a.rope_scaling
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    if arch == "megrez-moe":
        w.add_expert_count(a.n_routed_experts)
        w.add_expert_used_count(a.num_experts_per_tok)
        w.add_expert_shared_count(a.n_shared_experts or 0)
        w.add_leading_dense_block_count(a.first_k_dense_replace)
        w.add_expert_feed_forward_length(a.moe_intermediate_size)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if a.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_weights_norm(bool(a.norm_topk_prob))
        w.add_expert_weights_scale(float(a.routed_scaling_factor))
        w.add_expert_group_count(a.n_group)
        w.add_expert_group_used_count(a.topk_group)
        w.add_uint32(f"{arch}.expert_shared_frequency", a.experts_shared_frequency)
        w.add_uint32(f"{arch}.moe_layer_freq", a.moe_layer_freq)
        w.add_string(f"{arch}.expert_topk_method", a.topk_method)
        w.add_bool(f"{arch}.pre_gate", bool(a.pre_gate))
    config = model_config(model)
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    w.add_string("megrez.config", json.dumps(config, ensure_ascii=False))


def _write_tokenizer(w, tokenizer_dir, vocab_size: int) -> None:
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return
    d = Path(tokenizer_dir)
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (d / "tokenizer_config.json").is_file() else {}
    vocab = spec["model"]["vocab"]
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()}
    for tok, t in added.items():
        by_id[t["id"]] = tok
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(CONTROL if added[tok].get("special") else USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("megrez")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {tok: i for i, tok in enumerate(tokens)}

    def token_id(value):
        content = value.get("content") if isinstance(value, dict) else value
        return ids.get(content) if content else None

    eos = token_id(cfg.get("eos_token"))
    if eos is None:
        eos = ids.get("<|turn_end|>")
    if (bos := token_id(cfg.get("bos_token"))) is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if (eot := ids.get("<|turn_end|>")) is not None:
        w.add_eot_token_id(eot)
    if (pad := token_id(cfg.get("pad_token"))) is not None:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(False)
    from ..tokenizer import MEGREZ_CHAT_TEMPLATE

    template = cfg.get("chat_template")
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    w.add_chat_template(template if isinstance(template, str) else MEGREZ_CHAT_TEMPLATE)
    w.add_string("megrez.tokenizer.json", json.dumps(spec, ensure_ascii=False))
    if (d / "generation_config.json").is_file():
        w.add_string("megrez.generation_config", (d / "generation_config.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ reading

class GGUFCheckpoint:
    """A GGUF file as a checkpoint: its config, tokenizer files, and tensors under our (Hugging
    Face) names, stacked experts presented one expert per key as in a safetensors checkpoint."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        from ..quant.formats import BLOCK_SIZES, QType

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # truncated, not GGUF, corrupt header
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                                  f"is it truncated or corrupt?") from None
        self.arch = self._string("general.architecture")
        if self.arch not in HF_ARCH:
            raise CheckpointError(f"{self.path}: unsupported GGUF architecture {self.arch!r} "
                                  f"(supported: {', '.join(HF_ARCH)})")
        self.tensors = {}
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            try:
                qtype = QType(int(t.tensor_type))
                BLOCK_SIZES[qtype]
            except ValueError:
                name = getattr(t.tensor_type, "name", int(t.tensor_type))
                raise CheckpointError(f"{self.path}: tensor {t.name!r} has type {name}, which this engine does not "
                                      f"support (supported: {', '.join(q.name for q in BLOCK_SIZES)})") from None
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} but "
                                      f"the file has {size} bytes; the file is truncated")
            ours = our_name(t.name)
            if ours is None:
                raise CheckpointError(f"{self.path}: unexpected tensor {t.name!r} for architecture {self.arch!r}")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[ours] = (t, qtype, shape)
        self.config = self._config()

    # metadata ---------------------------------------------------------------------------
    def _field(self, key: str):
        return self.reader.fields.get(key)

    def _string(self, key: str, default=None):
        f = self._field(key)
        if f is None:
            if default is not None:
                return default
            raise CheckpointError(f"{self.path}: missing metadata key {key!r}")
        return bytes(f.parts[f.data[0]]).decode("utf-8")

    def _value(self, key: str, default=None):
        f = self._field(key)
        if f is None:
            return default
        v = f.parts[f.data[0]]
        if getattr(v, "dtype", None) == np.float32 and v.size == 1:
            return float(str(v.reshape(())[()]))  # the decimal a float32 was written from (1e-06, not 9.99e-07)
        return v.item() if hasattr(v, "item") and v.size == 1 else v

    def _strings(self, key: str) -> list[str] | None:
        f = self._field(key)
        return None if f is None else [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def _values(self, key: str) -> list | None:
        f = self._field(key)
        return None if f is None else [f.parts[i].item() for i in f.data]

    def _config(self) -> dict:
        stored = self._string("megrez.config", "")
        if stored:
            return json.loads(stored)
        a, arch = f"{self.arch}.", self.arch
        need = lambda k: self._required(a + k)  # noqa: E731
        tokens = self._strings("tokenizer.ggml.tokens")
        heads = need("attention.head_count")
        config = {
            "architectures": [HF_ARCH[arch][0]], "model_type": HF_ARCH[arch][1],
            "vocab_size": self._value(a + "vocab_size", len(tokens) if tokens else
                                      self.tensors.get("model.embed_tokens.weight", (None, None, [None]))[2][0]),
            "hidden_size": need("embedding_length"), "intermediate_size": need("feed_forward_length"),
            "num_hidden_layers": need("block_count"), "num_attention_heads": heads,
            "num_key_value_heads": self._value(a + "attention.head_count_kv", heads),
            "max_position_embeddings": self._value(a + "context_length", 4096),
            "rms_norm_eps": self._value(a + "attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._value(a + "rope.freq_base", 10000.0), "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
        }
        if (kl := self._value(a + "attention.key_length")) is not None:
            config["head_dim"] = kl
        if self._value(a + "rope.scaling.type") is not None and self._value(a + "rope.scaling.factor"):
            config["rope_scaling"] = {"rope_type": "linear", "factor": self._value(a + "rope.scaling.factor")}
        if arch == "megrez-moe":
            gating = self._value(a + "expert_gating_func", 2)
            config.update({
                "n_routed_experts": need("expert_count"), "num_experts_per_tok": need("expert_used_count"),
                "n_shared_experts": self._value(a + "expert_shared_count", 0),
                "first_k_dense_replace": self._value(a + "leading_dense_block_count", 1),
                "moe_intermediate_size": need("expert_feed_forward_length"),
                "scoring_func": "softmax" if gating == 1 else "sigmoid",
                "norm_topk_prob": bool(self._value(a + "expert_weights_norm", True)),
                "routed_scaling_factor": self._value(a + "expert_weights_scale", 1.0),
                "n_group": self._value(a + "expert_group_count", 1),
                "topk_group": self._value(a + "expert_group_used_count", 1),
                "experts_shared_frequency": self._value(a + "expert_shared_frequency", 3),
                "moe_layer_freq": self._value(a + "moe_layer_freq", 1),
                "topk_method": self._string(a + "expert_topk_method", "noaux_tc"),
                "pre_gate": bool(self._value(a + "pre_gate", True)),
            })
        for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            config[key] = self._value(f"tokenizer.ggml.{name}_token_id")
        return config

    def _required(self, key: str):
        v = self._value(key)
        if v is None:
            raise CheckpointError(f"{self.path}: missing metadata key {key!r}")
        return v

    def tokenizer_files(self) -> dict[str, str]:
        """tokenizer.json, tokenizer_config.json (and generation_config.json) rebuilt from the file."""
        files = {}
        spec = self._string("megrez.tokenizer.json", "")
        tokens = self._strings("tokenizer.ggml.tokens")
        if not spec and tokens is None:
            return files
        types = self._values("tokenizer.ggml.token_type") or [NORMAL] * len(tokens or [])
        if not spec:
            merges = self._strings("tokenizer.ggml.merges") or []
            vocab = {t: i for i, t in enumerate(tokens) if types[i] != UNUSED}
            added = [{"id": i, "content": t, "special": types[i] == CONTROL, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False}
                     for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
            spec = json.dumps({"version": "1.0", "added_tokens": added, "normalizer": None,
                               "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                 "use_regex": True},
                               "post_processor": None,
                               "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                           "use_regex": True},
                               "model": {"type": "BPE", "vocab": vocab, "merges": merges, "dropout": None,
                                         "unk_token": None, "continuing_subword_prefix": None,
                                         "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False}},
                              ensure_ascii=False)
        files["tokenizer.json"] = spec
        tok = lambda key: (tokens[i] if tokens and (i := self._value(key)) is not None and i < len(tokens)  # noqa: E731
                           else None)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "bos_token": tok("tokenizer.ggml.bos_token_id"), "eos_token": tok("tokenizer.ggml.eos_token_id"),
               "pad_token": tok("tokenizer.ggml.padding_token_id")}
        if (template := self._string("tokenizer.chat_template", "")):
            cfg["chat_template"] = template
        files["tokenizer_config.json"] = json.dumps(cfg, ensure_ascii=False)
        if (gen := self._string("megrez.generation_config", "")):
            files["generation_config.json"] = gen
        return files

    def tokenizer_dir(self) -> Path:
        """A directory holding the file's tokenizer (written once, in the cache)."""
        root = Path(os.environ.get("MEGREZ_CACHE") or Path.home() / ".cache" / "megrez") / "gguf"
        st = self.path.stat()
        key = hashlib.sha256(f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        d = root / f"{self.path.stem}-{key}"
        if not (d / "config.json").is_file():
            d.mkdir(parents=True, exist_ok=True)
            for name, text in self.tokenizer_files().items():
                (d / name).write_text(text, encoding="utf-8")
            (d / "config.json").write_text(json.dumps(self.config, ensure_ascii=False), encoding="utf-8")
        return d

    # tensors ----------------------------------------------------------------------------
    def types(self) -> dict:
        """Our parameter name -> the file's type, for tensors stored quantized."""
        return {ours: qtype for ours, (_, qtype, _) in self.tensors.items() if int(qtype) not in FLOAT_TYPES}

    def keys(self) -> list[str]:
        out = []
        for ours, (_, _, shape) in self.tensors.items():
            if ".mlp.experts." in ours:
                proj = ours.rsplit(".", 1)[1]
                out += [ours.replace(f"experts.{proj}", f"experts.{j}.{proj}") + ".weight" for j in range(shape[0])]
            else:
                out.append(ours)
        return out

    def _where(self, key: str):
        """(our stacked name, reader tensor, type, our shape, absolute byte offset) of ``key`` (one
        expert of a stacked tensor is a contiguous slice of it)."""
        ours, index = self._locate(key)
        t, qtype, shape = self.tensors[ours]
        offset = int(t.data_offset)
        if index is not None:
            offset += index * int(t.n_bytes) // shape[0]
            shape = shape[1:]
        return ours, t, qtype, shape, offset

    def _permuted(self, ours: str) -> bool:
        """llama.cpp stores a Llama's Q and K rows permuted for its RoPE layout."""
        return self.arch == "llama" and ours.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))

    def _pread(self, out: torch.Tensor, offset: int, name: str) -> None:
        # pread, not the reader's memory map: mapped pages would stay in the process's resident
        # set beside the copy (twice the file's size at the peak).
        view = memoryview(out.numpy()).cast("B")
        got = 0
        while got < len(view):
            n = os.preadv(self._fd(), [view[got:]], offset + got)
            if n == 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} is cut short at byte {offset + got}; "
                                      f"the file is truncated")
            got += n

    def read_quant_into(self, key: str, target) -> bool:
        """Read ``key`` straight into ``target`` (a QuantTensor of the file's type) when no
        conversion is needed; False otherwise (then :meth:`read` and a copy)."""
        ours, t, qtype, shape, offset = self._where(key)
        if (int(target.qtype) != int(qtype) or tuple(target.shape) != tuple(shape) or not target.data.is_contiguous()
                or self._permuted(ours)):
            return False
        self._pread(target.data, offset, t.name)
        return True

    def _fd(self) -> int:
        if getattr(self, "_file", None) is None:
            self._file = open(self.path, "rb", buffering=0)
            weakref.finalize(self, self._file.close)
        return self._file.fileno()

    def _locate(self, key: str):
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$", key)
        if m:
            return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
        return key, None

    def shape(self, key: str) -> list[int]:
        ours, index = self._locate(key)
        shape = self.tensors[ours][2]
        return list(shape[1:] if index is not None else shape)

    def read(self, key: str):
        """A float tensor (F32/F16/BF16 in the file) or a QuantTensor, in our layout."""
        from ..quant.formats import QuantTensor, row_bytes

        ours, t, qtype, shape, offset = self._where(key)
        rows = torch.empty(*shape[:-1], row_bytes(qtype, shape[-1]), dtype=torch.uint8)
        self._pread(rows, offset, t.name)
        if self._permuted(ours):
            heads = self.config["num_attention_heads"] if ".q_proj." in ours else \
                self.config.get("num_key_value_heads") or self.config["num_attention_heads"]
            rows = rope_unpermute(rows, heads).contiguous()
        qt = QuantTensor(rows, qtype, shape)
        return qt.dequantize() if int(qtype) in FLOAT_TYPES else qt


def is_gguf(path) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def tokenizer_path(path) -> Path:
    """Where a checkpoint's tokenizer files are: the directory, or for a GGUF file a directory
    they are unpacked into."""
    return GGUFCheckpoint(path).tokenizer_dir() if is_gguf(path) else Path(path)
