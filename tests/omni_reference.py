"""A float64 reference of Megrez-3B-Omni written from the specification, independent of the
package's model code: it reads the checkpoint's tensors by their official names and finds the
placeholder runs from the token ids alone (delimiter tokens), as the official model does with
its image/audio bounds."""
import math

import torch
import torch.nn.functional as F


def layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def mha(q, k, v, n_heads, key_mask=None):
    """q [Lq, D], k/v [Lk, D] -> [Lq, D]; key_mask [Lk] True where keys are valid."""
    d = q.shape[-1] // n_heads
    q, k, v = (t.view(t.shape[0], n_heads, d).transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[1], -1)


# ------------------------------------------------------------------------------------ vision
def bucket_ids(h, w, side):
    """Float32 bucketisation, as the spec requires (ties at bucket edges follow float32)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, dtype=torch.float32)
    fh = (torch.arange(h, dtype=torch.float32) * (1.0 / torch.tensor(float(h)))).clamp(max=1 - 1e-6)
    fw = (torch.arange(w, dtype=torch.float32) * (1.0 / torch.tensor(float(w)))).clamp(max=1 - 1e-6)
    bh = torch.bucketize(fh, boundaries, right=True)
    bw = torch.bucketize(fw, boundaries, right=True)
    return (bh[:, None] * side + bw[None, :]).reshape(-1)


def vision_crop(sd, vcfg, crop):
    """One raw-pixel crop [3, H, W] -> SigLIP features [h*w, D] (no padding, no mask needed)."""
    p, side = vcfg["patch_size"], vcfg["image_size"] // vcfg["patch_size"]
    eps, heads = vcfg["layer_norm_eps"], vcfg["num_attention_heads"]
    pre = "vision.vpm."
    x = (crop.double() - 127.5) / 127.5
    h, w = x.shape[1] // p, x.shape[2] // p
    patches = x.unfold(1, p, p).unfold(2, p, p)  # [3, h, w, p, p]
    patches = patches.permute(1, 2, 0, 3, 4).reshape(h * w, -1)
    wconv = sd[pre + "embeddings.patch_embedding.weight"].reshape(vcfg["hidden_size"], -1)
    x = patches @ wconv.T + sd[pre + "embeddings.patch_embedding.bias"]
    x = x + sd[pre + "embeddings.position_embedding.weight"][bucket_ids(h, w, side)]
    for i in range(vcfg["num_hidden_layers"]):
        L = f"{pre}encoder.layers.{i}."
        y = layer_norm(x, sd, L + "layer_norm1", eps)
        q, k, v = (y @ sd[L + f"self_attn.{n}_proj.weight"].T + sd[L + f"self_attn.{n}_proj.bias"] for n in "qkv")
        x = x + mha(q, k, v, heads) @ sd[L + "self_attn.out_proj.weight"].T + sd[L + "self_attn.out_proj.bias"]
        y = layer_norm(x, sd, L + "layer_norm2", eps)
        y = F.gelu(y @ sd[L + "mlp.fc1.weight"].T + sd[L + "mlp.fc1.bias"], approximate="tanh")
        x = x + y @ sd[L + "mlp.fc2.weight"].T + sd[L + "mlp.fc2.bias"]
    return layer_norm(x, sd, pre + "post_layernorm", eps), (h, w)


def sincos_pos(embed_dim, h, w):
    """2D sin-cos, first half of the channels = column index, second = row index, each half
    [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (D/4))."""
    quarter = embed_dim // 4
    out = torch.empty(h, w, embed_dim, dtype=torch.float64)
    k = torch.arange(quarter, dtype=torch.float64)
    omega = 10000.0 ** (-k / quarter)
    for i in range(h):
        for j in range(w):
            out[i, j, :quarter] = torch.sin(j * omega)
            out[i, j, quarter:2 * quarter] = torch.cos(j * omega)
            out[i, j, 2 * quarter:3 * quarter] = torch.sin(i * omega)
            out[i, j, 3 * quarter:] = torch.cos(i * omega)
    return out.reshape(h * w, embed_dim)


def resampler(sd, feats, hw, embed_dim):
    pre = "vision.resampler."
    h, w = hw
    kv = layer_norm(feats @ sd[pre + "kv_proj.weight"].T, sd, pre + "ln_kv", 1e-6)
    pos = sincos_pos(embed_dim, max(h, 70), max(w, 70)).reshape(max(h, 70), max(w, 70), -1)[:h, :w].reshape(h * w, -1)
    q = layer_norm(sd[pre + "query"], sd, pre + "ln_q", 1e-6)
    wq, wk, wv = sd[pre + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[pre + "attn.in_proj_bias"].chunk(3)
    heads = embed_dim // 128
    out = mha(q @ wq.T + bq, (kv + pos) @ wk.T + bk, kv @ wv.T + bv, heads)
    out = out @ sd[pre + "attn.out_proj.weight"].T + sd[pre + "attn.out_proj.bias"]
    return layer_norm(out, sd, pre + "ln_post", 1e-6) @ sd[pre + "proj"]


# ------------------------------------------------------------------------------------ audio
def audio_clip(sd, acfg, mel, mel_len):
    """mel [n_mels, 3000], valid frames -> [n_tok + 2, output_dim] (bos, features, eos)."""
    pre = "audio.audio."
    l_cnn = 1 + (mel_len - 1) // 2
    n_tok = (l_cnn - 2) // 2 + 1
    x = mel[:, : 2 * l_cnn].double()[None]
    x = F.gelu(F.conv1d(x, sd[pre + "conv1.weight"], sd[pre + "conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, sd[pre + "conv2.weight"], sd[pre + "conv2.bias"], stride=2, padding=1))[0].T
    x = x + sd[pre + "positional_embedding"][: x.shape[0]]
    for i in range(acfg["n_layer"]):
        B = f"{pre}blocks.{i}."
        y = layer_norm(x, sd, B + "attn_ln", 1e-5)
        q = y @ sd[B + "attn.query.weight"].T + sd[B + "attn.query.bias"]
        k = y @ sd[B + "attn.key.weight"].T
        v = y @ sd[B + "attn.value.weight"].T + sd[B + "attn.value.bias"]
        x = x + mha(q, k, v, acfg["n_head"]) @ sd[B + "attn.out.weight"].T + sd[B + "attn.out.bias"]
        y = layer_norm(x, sd, B + "mlp_ln", 1e-5)
        y = F.gelu(y @ sd[B + "mlp.0.weight"].T + sd[B + "mlp.0.bias"])
        x = x + y @ sd[B + "mlp.2.weight"].T + sd[B + "mlp.2.bias"]
    x = F.avg_pool1d(x.T[None], 2, 2)[0].T
    x = layer_norm(x, sd, pre + "ln_post", 1e-5) @ sd[pre + "proj.weight"].T + sd[pre + "proj.bias"]
    bos_eos = sd[pre + "audio_bos_eos_token.weight"]
    return torch.cat([bos_eos[:1], x[:n_tok], bos_eos[1:]])


# ------------------------------------------------------------------------------------ LLM
def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def llm_logits(sd, cfg, embeds):
    """embeds [T, H] -> logits [T, V]: Llama with GQA, rotate-half RoPE, SwiGLU, no cache."""
    T, H = embeds.shape
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh
    eps = cfg["rms_norm_eps"]
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # [heads, T, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = embeds.double()
    for i in range(cfg["num_hidden_layers"]):
        L = f"llm.model.layers.{i}."
        y = rms_norm(x, sd[L + "input_layernorm.weight"], eps)
        q = (y @ sd[L + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        k = (y @ sd[L + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        v = (y @ sd[L + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        s = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        a = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, H)
        x = x + a @ sd[L + "self_attn.o_proj.weight"].T
        y = rms_norm(x, sd[L + "post_attention_layernorm.weight"], eps)
        g = F.silu(y @ sd[L + "mlp.gate_proj.weight"].T) * (y @ sd[L + "mlp.up_proj.weight"].T)
        x = x + g @ sd[L + "mlp.down_proj.weight"].T
    return rms_norm(x, sd["llm.model.norm.weight"], eps) @ sd["llm.lm_head.weight"].T


# ------------------------------------------------------------------------------------ fusion
def runs_between(ids, start_id, end_id):
    """(start, end) of every token run strictly between a start and an end delimiter."""
    out, open_at = [], None
    for i, t in enumerate(ids):
        if t == start_id:
            open_at = i
        elif t == end_id and open_at is not None:
            out.append((open_at, i))
            open_at = None
    return out


def fused_embeddings(sd, cfg, ids, crops, mels, tokens):
    """Text embeddings with image crops written at [start+1, end) of each <image>...</image>
    (start = index of the delimiter; the official image_bounds' start is already past it) and
    audio windows (bos and eos included) at [start+1, end) of each <audio>...</audio>."""
    x = sd["llm.model.embed_tokens.weight"][torch.tensor(ids)].clone()
    image_runs = runs_between(ids, tokens["<image>"], tokens["</image>"])
    assert len(image_runs) == len(crops), (len(image_runs), len(crops))
    for (s, e), crop in zip(image_runs, crops):
        feats, hw = vision_crop(sd, cfg["vision_config"], crop)
        x[s + 1:e] = resampler(sd, feats, hw, cfg["hidden_size"])
    audio_runs = runs_between(ids, tokens["<audio>"], tokens["</audio>"])
    assert len(audio_runs) == len(mels)
    for (s, e), (mel, n) in zip(audio_runs, mels):
        x[s + 1:e] = audio_clip(sd, cfg["audio_config"], mel, n)
    return x


def greedy(sd, cfg, embeds, ids, n_new, embed_weight):
    """Greedy tokens by recomputing the whole sequence each step (no KV cache)."""
    out = []
    x = embeds
    for _ in range(n_new):
        tok = int(llm_logits(sd, cfg, x)[-1].argmax())
        out.append(tok)
        x = torch.cat([x, embed_weight[tok][None]])
    return out
