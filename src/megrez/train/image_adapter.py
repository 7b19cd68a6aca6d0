"""Teach a text model to see, on synthetic pictures, and export a MegrezO checkpoint that
``megrez chat --image`` loads like any other. Two stages, as multimodal models are built
from a pre-trained image encoder:

1. the vision module (a small navit SigLIP tower and the resampler) learns to see: linear
   heads on its pooled output classify each picture's colour and content;
2. the adapter (the vision module and the embeddings of the new image delimiter tokens) and,
   with ``host_lr > 0``, the text model itself learn to answer questions about pictures.

A text model this small cannot be steered by its input vectors alone: with it frozen, the
answer loss stalls above 5 nats per token (docs/omni.md), so the recipe fine-tunes it too.

    megrez train image-adapter --base src/megrez/assets/megrez2-tiny-chat --out runs-out/omni

The base can be any text model the engine loads (the bundled Megrez2 is hosted through
MegrezO's ``llm_architecture``). The prompts are built by the same code as at inference
(``megrez.multimodal.prompt``), and the loss is the SFT loss on the answer tokens only.
"""
from __future__ import annotations

import json
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import load_model, save_model
from ..models import build_model
from ..multimodal.image import slice_image
from ..multimodal.prompt import Media, PromptBuilder, load_messages
from ..tiny import OMNI_SPECIAL_TOKENS
from ..tokenizer import Tokenizer
from .optim import build_optimizer, lr_at, param_groups, set_lr
from .synthetic_images import COLOURS, DIGITS, SHAPES, make_picture

IMAGE_TOKENS = OMNI_SPECIAL_TOKENS[:5]  # <|unk|>, <image>, </image>, <slice>, </slice>


@dataclass
class AdapterConfig:
    base: str = "src/megrez/assets/megrez2-tiny-chat"
    out: str = "runs-out/omni-adapter"
    steps: int = 400
    batch_size: int = 16
    lr: float = 2e-3                   # stage 2: the adapter
    host_lr: float = 0.0               # stage 2: the text model (0: frozen)
    tower_lr: float | None = None      # stage 2: the SigLIP tower (None: --lr; 0: frozen)
    vision_steps: int = 0              # stage 1 (0: none)
    vision_batch_size: int = 32
    vision_lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    image_size: int = 112              # synthetic pictures are image_size x image_size
    query_num: int = 8
    vision: dict = field(default_factory=lambda: {"hidden_size": 128, "intermediate_size": 256,
                                                  "num_hidden_layers": 3, "num_attention_heads": 4,
                                                  "image_size": 112, "patch_size": 14})
    eval_pictures: int = 200
    seed: int = 0
    export_dtype: str = "bfloat16"
    log_every: int = 20
    threads: int | None = None         # CPU threads (on a busy machine, 1 is often fastest)


def extend_tokenizer(base: Path, tokens: list[str]) -> tuple[dict[str, str], int]:
    """The base tokenizer files with ``tokens`` added as special tokens (new ids at the end)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HF

    tok = HF.from_file(str(base / "tokenizer.json"))
    old = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    files = {"tokenizer.json": tok.to_str()}
    cfg = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = cfg.setdefault("added_tokens_decoder", {})
    for t in tokens:
        decoder[str(tok.token_to_id(t))] = {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                            "normalized": False, "single_word": False}
    files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
    gen = base / "generation_config.json"
    if gen.is_file():
        files["generation_config.json"] = gen.read_text(encoding="utf-8")
    return files, old


class Adapter(nn.Module):
    """What is trained: the vision module and the new tokens' input embeddings."""

    def __init__(self, vision: nn.Module, n_new: int, hidden: int):
        super().__init__()
        self.vision = vision
        self.new_embeddings = nn.Parameter(torch.randn(n_new, hidden) * 0.02)


def build(cfg: AdapterConfig):
    base = Path(cfg.base)
    text = load_model(base, device="cpu", dtype="float32")
    files, old_vocab = extend_tokenizer(base, IMAGE_TOKENS)
    config = {**text.hf_config, "architectures": ["MegrezO"], "model_type": "megrezo",
              "llm_architecture": text.hf_config["architectures"][0], "vocab_size": old_vocab + len(IMAGE_TOKENS),
              "vision_config": {"model_type": "siglip_vision_model", "num_channels": 3,
                                "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, **cfg.vision},
              "audio_config": None, "query_num": cfg.query_num, "patch_size": cfg.vision["patch_size"],
              "scale_resolution": cfg.image_size, "max_slice_nums": 1}
    model = build_model(config, source="image adapter config")
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        sd = text.state_dict()
        for name, p in model.llm.state_dict().items():
            src = sd[name]
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                p[:old_vocab] = src
                # The new tokens are never to be generated: their output rows copy that of a
                # token the chat model never produces.
                p[old_vocab:] = src[4] if name == "lm_head.weight" else 0.0
            else:
                p.copy_(src)
    model.hf_config = config
    model.llm.requires_grad_(False)
    adapter = Adapter(model.vision, len(IMAGE_TOKENS), config["hidden_size"])
    return model, adapter, files, old_vocab


def picture_slices(pic, cfg: AdapterConfig):
    """A synthetic picture as the image pipeline slices it: one crop, no further slices."""
    return slice_image(pic.image, cfg.image_size, 1, cfg.vision["patch_size"])


def example(rng: random.Random, cfg: AdapterConfig, builder: PromptBuilder, tok: Tokenizer):
    pic = make_picture(rng, cfg.image_size)
    question, answer = rng.choice(pic.questions())
    msgs, _ = load_messages([{"role": "user", "content": [{"type": "image", "image": pic.image},
                                                          {"type": "text", "text": question}]}])
    media = [Media("image", "picture", image=picture_slices(pic, cfg))]
    prompt = builder.build(msgs, media)
    target = tok.encode(answer, add_special_tokens=False) + [tok.token_to_id("<|turn_end|>")]
    return prompt, target, media[0].image.crops[0]


class RecordingContext:
    """Causal attention over one row that keeps every layer's keys and values."""

    def __init__(self, length: int, device):
        self.positions = torch.arange(length, device=device)[None]
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer_idx, q, k, v):
        from ..models.base import sdpa

        self.kv[layer_idx] = (k, v)
        return sdpa(q, k, v, is_causal=True)


class PrefixContext:
    """Attention for rows that all continue one fixed prefix (the system prompt and the user
    turn's opening), whose keys and values were computed once: every token sees the whole
    prefix and, causally, its own row."""

    def __init__(self, prefix: RecordingContext, batch: int, length: int, device):
        from ..models.base import sdpa

        self.sdpa, self.prefix = sdpa, prefix
        n = prefix.positions.shape[1]
        self.positions = (torch.arange(length, device=device) + n).expand(batch, length)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        self.mask = torch.cat([torch.ones(length, n, dtype=torch.bool, device=device), causal], 1)[None, None]

    def attend(self, layer_idx, q, k, v):
        pk, pv = self.prefix.kv[layer_idx]
        b = q.shape[0]
        k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
        return self.sdpa(q, k, v, mask=self.mask)


def shared_prefix(model, adapter, old_vocab: int, ids: list[int]) -> RecordingContext:
    """Keys and values of the prompt tokens before the image (the same in every example)."""
    table = torch.cat([model.llm.model.embed_tokens.weight[:old_vocab], adapter.new_embeddings.detach()])
    ctx = RecordingContext(len(ids), table.device)
    with torch.no_grad():
        model.llm(None, cache=ctx, input_embeddings=F.embedding(torch.tensor([ids]), table))
    return ctx


def forward_loss(model, adapter, old_vocab: int, batch, prefix: RecordingContext | None = None):
    """Mean cross-entropy of the answer tokens of a batch of (prompt, target, crop). With
    ``prefix``, every prompt starts with its tokens, whose keys/values are reused."""
    skip = prefix.positions.shape[1] if prefix is not None else 0
    rows = [p.token_ids[skip:] + t for p, t, _ in batch]
    longest = max(map(len, rows))
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    for b, ((p, t, _), row) in enumerate(zip(batch, rows)):
        ids[b, : len(row)] = torch.tensor(row)
        n = len(p.token_ids) - skip
        labels[b, n - 1: n - 1 + len(t)] = torch.tensor(t)  # position i predicts token i + 1
    table = torch.cat([model.llm.model.embed_tokens.weight[:old_vocab], adapter.new_embeddings])
    h = F.embedding(ids, table)
    vectors = adapter.vision([c for _, _, c in batch])          # [B, Q, H]
    starts = torch.tensor([p.runs[0][0] - skip for p, _, _ in batch])
    q = vectors.shape[1]
    rows_idx = torch.arange(len(batch))[:, None].expand(-1, q)
    cols_idx = starts[:, None] + torch.arange(q)[None]
    h = h.index_put((rows_idx.reshape(-1), cols_idx.reshape(-1)), vectors.reshape(-1, vectors.shape[-1]))
    ctx = PrefixContext(prefix, h.shape[0], h.shape[1], h.device) if prefix is not None else None
    logits = model.llm(None, cache=ctx, input_embeddings=h)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def evaluate(path: Path, cfg: AdapterConfig, n: int, seed: int) -> dict:
    """Greedy answers of the exported checkpoint, through the engine, on fresh pictures."""
    from ..engine import SamplingParams
    from ..llm import LLM

    llm = LLM(path, device="cpu", dtype="float32", max_num_seqs=16)
    rng = random.Random(seed)
    convs, answers, kinds = [], [], []
    for _ in range(n):
        pic = make_picture(rng, cfg.image_size)
        for question, answer in pic.questions():
            convs.append([{"role": "user", "content": [{"type": "image", "image": pic.image},
                                                       {"type": "text", "text": question}]}])
            answers.append(answer)
            kinds.append(("shape" if "shape" in question else "digit") if "colour" not in question else "colour")
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=8))
    right = [o.text.strip() == a for o, a in zip(outs, answers)]
    per = {k: sum(r for r, kk in zip(right, kinds) if kk == k) / max(1, kinds.count(k)) for k in set(kinds)}
    return {"accuracy": sum(right) / len(right), "questions": len(right), **{f"accuracy_{k}": v for k, v in per.items()},
            "examples": [(a, o.text) for a, o in list(zip(answers, outs))[:6]]}


def pretrain_vision(vision: nn.Module, hidden: int, cfg: AdapterConfig, rng: random.Random) -> dict:
    """Stage 1: the vision module's mean output vector (``hidden`` wide, the text model's
    width), through two linear heads, classifies each picture's colour and content (a shape or
    a digit). Returns the training accuracies over the last 20 steps (content also split into
    shapes and digits)."""
    colours, contents = list(COLOURS), list(SHAPES) + list(DIGITS)
    heads = nn.ModuleDict({"colour": nn.Linear(hidden, len(colours)), "content": nn.Linear(hidden, len(contents))})
    params = nn.ModuleList([vision, heads])
    opt = build_optimizer(params, cfg.vision_lr, cfg.weight_decay)
    from tqdm import tqdm

    steps = deque(maxlen=20)  # per step: each head's right/wrong per picture, and content by kind
    bar = tqdm(range(cfg.vision_steps), desc="vision (stage 1)", unit="step", mininterval=1.0)
    for step in bar:
        set_lr(opt, lr_at(step, cfg.vision_lr, cfg.vision_steps, cfg.warmup_steps, 0.1))
        pics = [make_picture(rng, cfg.image_size) for _ in range(cfg.vision_batch_size)]
        pooled = vision([picture_slices(p, cfg).crops[0] for p in pics]).mean(1)
        want = {"colour": torch.tensor([colours.index(p.colour) for p in pics]),
                "content": torch.tensor([contents.index(p.what) for p in pics])}
        logits = {k: h(pooled) for k, h in heads.items()}
        loss = sum(F.cross_entropy(logits[k], want[k]) for k in heads)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hit = {k: (logits[k].argmax(1) == want[k]).tolist() for k in heads}
        steps.append({**hit, "shape": [h for p, h in zip(pics, hit["content"]) if p.kind == "shape"],
                      "digit": [h for p, h in zip(pics, hit["content"]) if p.kind == "digit"]})
        if (step + 1) % cfg.log_every == 0:
            recent = accuracies(list(steps))
            bar.write(f"vision step {step + 1}: loss {float(loss.detach()):.4f}, training accuracy colour "
                      f"{recent['colour']:.1%}, content {recent['content']:.1%} (shapes {recent['shape']:.1%}, "
                      f"digits {recent['digit']:.1%})")
    return {f"vision_accuracy_{k}": round(v, 4) for k, v in accuracies(list(steps)).items()}


def accuracies(steps: list[dict]) -> dict:
    """Each key's fraction of right answers over the given steps' pictures."""
    return {k: sum(sum(s[k]) for s in steps) / max(1, sum(len(s[k]) for s in steps)) for k in steps[0]} if steps else {}


def train_adapter(cfg: AdapterConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, adapter, files, old_vocab = build(cfg)
    out = Path(cfg.out)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (tok_dir / name).write_text(content, encoding="utf-8")
    tok = Tokenizer(tok_dir)
    builder = PromptBuilder(tok, cfg.query_num)
    rng = random.Random(cfg.seed)
    t0 = time.perf_counter()
    stage1 = pretrain_vision(adapter.vision, model.hf_config["hidden_size"], cfg, rng) if cfg.vision_steps else {}
    # The adapter proper (the resampler and the delimiter embeddings) learns at lr; the tower,
    # which stage 1 taught to see, at its own rate, or not at all: what a frozen tower learned
    # to tell apart survives stage 2 (docs/omni.md). The text model likewise, at host_lr.
    tower = adapter.vision.vpm
    tower.requires_grad_(False)
    opt = build_optimizer(adapter, cfg.lr, cfg.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = cfg.lr
    for module, lr in ((tower, cfg.lr if cfg.tower_lr is None else cfg.tower_lr), (model.llm, cfg.host_lr)):
        if lr > 0:
            module.requires_grad_(True)
            for g in param_groups(module, cfg.weight_decay):
                opt.add_param_group({**g, "lr": lr, "base_lr": lr})
    trained = [p for g in opt.param_groups for p in g["params"]]
    log = []
    from tqdm import tqdm

    bar = tqdm(range(cfg.steps), desc="image adapter", unit="step", mininterval=1.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, g["base_lr"], cfg.steps, cfg.warmup_steps, 0.1)
        batch = [example(rng, cfg, builder, tok) for _ in range(cfg.batch_size)]
        # The tokens before the image (system prompt, user turn opening) are the same in every
        # example and, with the text model frozen, do not depend on what is trained except the
        # delimiter rows, which they do not contain: their keys/values are computed once per
        # step, without gradients. A trained text model needs their gradients: no reuse.
        head = batch[0][0].token_ids[: batch[0][0].runs[0][0] - 1]
        same = all(p.token_ids[: len(head)] == head for p, _, _ in batch) and old_vocab > max(head)
        reuse = same and head and cfg.host_lr == 0
        prefix = shared_prefix(model, adapter, old_vocab, head) if reuse else None
        loss = forward_loss(model, adapter, old_vocab, batch, prefix)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append(float(loss.detach()))
        bar.set_postfix(loss=f"{log[-1]:.3f}")
        if (step + 1) % cfg.log_every == 0:
            bar.write(f"step {step + 1}: loss {sum(log[-cfg.log_every:]) / cfg.log_every:.4f}")
    with torch.no_grad():
        model.llm.model.embed_tokens.weight[old_vocab:] = adapter.new_embeddings
    final = out / "final"
    dtype = torch.bfloat16 if cfg.export_dtype == "bfloat16" else torch.float32
    save_model(model, final, dtype=dtype, extra_files=files)
    train_seconds = time.perf_counter() - t0
    # Held-out pictures: a different seed than any training picture's.
    result = evaluate(final, cfg, cfg.eval_pictures, seed=10_000 + cfg.seed)
    summary = {"final": str(final), "steps": cfg.steps, "train_seconds": round(train_seconds, 1),
               "final_loss": sum(log[-cfg.log_every:]) / min(len(log), cfg.log_every), **stage1, **result,
               "losses": [round(x, 4) for x in log], "config": asdict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def register(sub) -> None:
    """``megrez train image-adapter``: flags are the fields of AdapterConfig."""
    import argparse
    from dataclasses import fields

    p = sub.add_parser("image-adapter", help="train an image adapter onto a frozen text model (synthetic pictures)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(AdapterConfig):
        if f.name == "vision":
            p.add_argument("--vision", type=json.loads, default=argparse.SUPPRESS,
                           help="JSON object of vision_config keys")
            continue
        default = f.default
        kind = int if "int" in f.type else float if "float" in f.type else str  # "float | None" too
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                       help=f"(default: {default})")
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    import sys

    given = {k: v for k, v in vars(a).items() if k not in ("func", "command", "train_command")}
    summary = train_adapter(AdapterConfig(**given))
    short = {k: v for k, v in summary.items() if k not in ("losses", "config")}
    sys.stdout.write(json.dumps(short, ensure_ascii=False) + "\n")
    return 0
