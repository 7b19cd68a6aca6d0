"""Megrez-3B-Omni numerics on random weights (CPU, float32): the towers against transformers
where the architectures coincide, and against the float64 reference written from the
specification (tests/omni_reference.py) where they do not; then the whole model."""
import json
import math

import omni_reference as ref
import pytest
import torch

from megrez import LLM, SamplingParams
from megrez.loading import load_model
from megrez.models.omni.vision import bucket_position_ids
from megrez.multimodal.audio import audio_features, log_mel
from megrez.multimodal.prompt import load_messages  # noqa: I001

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")


def float32_bound(*terms):
    """Rounding bound for float32 sums of products: n * eps * sum|terms| (with a factor of a
    few for the layers stacked on top; the tests compare against float64 or another float32
    order of summation)."""
    return sum(terms) * 2 ** -24


@pytest.fixture(scope="module")
def omni(tiny_omni):
    return load_model(tiny_omni, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sd64(omni):
    return {k: v.double() for k, v in omni.state_dict().items()} | {
        "audio.audio.positional_embedding": omni.audio.audio.positional_embedding.double()}


@pytest.fixture(scope="module")
def cfg(tiny_omni):
    return json.loads((tiny_omni / "config.json").read_text())


def random_crop(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 14 * h, 14 * w), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------ vision
@pytest.mark.slow
def test_position_buckets_match_transformers_navit_for_every_grid():
    """Idefics2's navit embeddings are transformers' float32 implementation of the same
    bucketing; every crop grid up to the 70 x 70 table must get identical ids."""
    from transformers.models.idefics2 import modeling_idefics2 as m

    emb = m.Idefics2VisionEmbeddings(transformers.Idefics2VisionConfig(hidden_size=8, image_size=980, patch_size=14))
    captured = {}
    emb.position_embedding.register_forward_pre_hook(lambda module, args: captured.__setitem__("ids", args[0]))
    for h in range(1, 71):
        for w in (1, 2, 3, 7, 13, 35, 64, 70) if h % 7 else range(1, 71):
            mask = torch.ones(1, h, w, dtype=torch.bool)
            emb(torch.zeros(1, 3, 14 * h, 14 * w), mask)
            assert torch.equal(bucket_position_ids(h, w, 70), captured["ids"][0]), (h, w)


@pytest.mark.slow
def test_vision_full_crop_matches_siglip(omni):
    """A full-size square crop is plain SigLIP: ids 0..N-1, no padding. 980 px = 70 x 70 patches."""
    vcfg = omni.args.vision
    hf_cfg = transformers.SiglipVisionConfig(hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size,
                                             num_hidden_layers=vcfg.num_hidden_layers,
                                             num_attention_heads=vcfg.num_attention_heads, image_size=vcfg.image_size,
                                             patch_size=vcfg.patch_size, layer_norm_eps=vcfg.layer_norm_eps,
                                             hidden_act=vcfg.hidden_act, vision_use_head=False)
    hf = transformers.SiglipVisionModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(omni.vision.vpm.state_dict(), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    assert torch.equal(bucket_position_ids(70, 70, 70), torch.arange(4900))
    crop = random_crop(70, 70, 0)
    with torch.no_grad():
        theirs = hf(pixel_values=((crop.float() - 127.5) / 127.5)[None]).last_hidden_state[0]
        mine, valid = omni.vision.vpm([((crop.float() - 127.5) / 127.5)])
    assert valid.all()
    # LayerNorm outputs are O(1); 4900-key softmax averages and 2 layers of D=64 dot products.
    assert (mine[0] - theirs).abs().max().item() <= 1e-4


def test_vision_padded_batch_matches_transformers_navit(omni):
    """Crops of different sizes in one padded batch (key-padding mask) against transformers'
    Idefics2 navit encoder, which masks the same way."""
    vcfg = omni.args.vision
    hf_cfg = transformers.Idefics2VisionConfig(hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size,
                                               num_hidden_layers=vcfg.num_hidden_layers,
                                               num_attention_heads=vcfg.num_attention_heads,
                                               image_size=vcfg.image_size, patch_size=vcfg.patch_size,
                                               layer_norm_eps=vcfg.layer_norm_eps, hidden_act=vcfg.hidden_act)
    hf_cfg._attn_implementation = "eager"
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    hf = Idefics2VisionTransformer(hf_cfg).eval()
    hf.load_state_dict(omni.vision.vpm.state_dict())
    sizes = [(22, 46), (27, 37), (35, 10), (7, 70)]
    crops = [random_crop(h, w, i) for i, (h, w) in enumerate(sizes)]
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    pix = torch.zeros(len(crops), 3, 14 * H, 14 * W)
    mask = torch.zeros(len(crops), H, W, dtype=torch.bool)
    for b, (c, (h, w)) in enumerate(zip(crops, sizes)):
        pix[b, :, : 14 * h, : 14 * w] = (c.float() - 127.5) / 127.5
        mask[b, :h, :w] = True
    with torch.no_grad():
        theirs = hf(pixel_values=pix, patch_attention_mask=mask).last_hidden_state.view(len(crops), H, W, -1)
        mine, valid = omni.vision.vpm([(c.float() - 127.5) / 127.5 for c in crops])
    for b, (h, w) in enumerate(sizes):
        assert valid[b].sum() == h * w
        diff = (mine[b, : h * w] - theirs[b, :h, :w].reshape(h * w, -1)).abs().max().item()
        assert diff <= 1e-4, (sizes[b], diff)


def test_vision_tower_and_resampler_match_float64_reference(omni, sd64):
    """The whole image path per crop (normalisation, buckets, encoder, 2D sin-cos keys,
    resampler) against the float64 reference, crops batched with padding as in a prompt."""
    sizes = [(32, 32), (22, 46), (27, 37), (5, 3)]
    crops = [random_crop(h, w, 10 + i) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        mine = omni.encode_images(crops)
    for b, crop in enumerate(crops):
        feats, hw = ref.vision_crop(sd64, {**omni.args.vision.__dict__}, crop)
        want = ref.resampler(sd64, feats, hw, omni.args.hidden_size)
        # Resampler outputs go through ln_post and a 256-wide projection: |y| ~ sum|proj| ~ a few.
        bound = 1e-4 * max(1.0, want.abs().max().item())
        assert (mine[b].double() - want).abs().max().item() <= bound, sizes[b]


def test_resampler_table_grows_beyond_70():
    from megrez.models.omni.vision import sincos_2d

    big = sincos_2d(256, 72, 75)
    assert big.shape == (72, 75, 256)
    assert torch.allclose(big[:70, :70], sincos_2d(256, 70, 70))
    assert torch.allclose(big.reshape(-1, 256).double(), ref.sincos_pos(256, 72, 75), atol=1e-6)


# ------------------------------------------------------------------------------------ audio
def whisper_encoder(omni):
    a = omni.args.audio
    cfg = transformers.WhisperConfig(d_model=a.n_state, encoder_layers=a.n_layer, encoder_attention_heads=a.n_head,
                                     encoder_ffn_dim=4 * a.n_state, num_mel_bins=a.n_mels,
                                     max_source_positions=a.n_ctx, activation_function="gelu")
    cfg._attn_implementation = "eager"
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    enc = WhisperEncoder(cfg).eval()
    ours = omni.audio.audio
    names = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    sd = {"conv1.weight": ours.conv1.weight, "conv1.bias": ours.conv1.bias, "conv2.weight": ours.conv2.weight,
          "conv2.bias": ours.conv2.bias, "embed_positions.weight": ours.positional_embedding}
    for i, blk in enumerate(ours.blocks):
        p = f"layers.{i}."
        for a_name, b_name in names.items():
            lin = getattr(blk.attn, a_name)
            sd[p + f"self_attn.{b_name}.weight"] = lin.weight
            if lin.bias is not None:
                sd[p + f"self_attn.{b_name}.bias"] = lin.bias
        for src, dst in (("attn_ln", "self_attn_layer_norm"), ("mlp_ln", "final_layer_norm")):
            sd[p + dst + ".weight"], sd[p + dst + ".bias"] = getattr(blk, src).weight, getattr(blk, src).bias
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = blk.mlp[0].weight, blk.mlp[0].bias
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = blk.mlp[2].weight, blk.mlp[2].bias
    sd["layer_norm.weight"], sd["layer_norm.bias"] = torch.ones(a.n_state), torch.zeros(a.n_state)
    enc.load_state_dict(sd)
    enc.layer_norm = torch.nn.Identity()  # ours pools first and normalises after (ln_post)
    return enc


@pytest.mark.slow
def test_audio_encoder_matches_transformers_whisper(omni):
    """A full 30 s window: transformers' WhisperEncoder up to its last block, then the Omni
    tail (x2 average pool, ln_post, projection, bos/eos) by hand."""
    enc = whisper_encoder(omni)
    g = torch.Generator().manual_seed(1)
    mel = log_mel(0.1 * torch.randn(30 * 16000, generator=g))[None]
    ours = omni.audio.audio
    with torch.no_grad():
        hidden = enc(mel).last_hidden_state
        pooled = torch.nn.functional.avg_pool1d(hidden.transpose(1, 2), 2, 2).transpose(1, 2)
        theirs = ours.proj(ours.ln_post(pooled))[0]
        mine = omni.encode_audio(mel, [3000])[0]
    assert mine.shape == (752, omni.args.hidden_size)  # 750 + bos + eos: the 30 s maximum
    assert torch.equal(mine[0], ours.audio_bos_eos_token.weight[0])
    assert torch.equal(mine[-1], ours.audio_bos_eos_token.weight[1])
    # 1500-key attention and D=64 products; outputs are LayerNorm-scaled projections of O(1).
    assert (mine[1:-1] - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seconds", [1.0, 7.3, 30.0])
def test_log_mel_matches_whisper_feature_extractor(seconds):
    """<= 1e-4: features are (log10 + 4) / 4 of float64 power spectra here; transformers
    rounds its float32 input and output, ~1e-7 relative on values of O(1)."""
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    g = torch.Generator().manual_seed(2)
    x = (0.2 * torch.randn(int(seconds * 16000), generator=g)).float()
    theirs = fe(x.numpy(), sampling_rate=16000, return_tensors="pt").input_features[0]
    assert (log_mel(x) - theirs).abs().max().item() <= 1e-4


def test_audio_clip_matches_float64_reference_with_odd_length_and_batch(omni, sd64):
    """Two clips of different lengths (one with an odd mel length) batched: the padded frames
    are masked, the mel is cropped to 2 * L_cnn, spans are n_tok + 2."""
    g = torch.Generator().manual_seed(3)
    feats = [audio_features(0.1 * torch.randn(n, generator=g)) for n in (16000 + 160 * 7, 3 * 16000)]
    mels = torch.cat([f.mels for f in feats])
    lens = [n for f in feats for n in f.mel_lens]
    assert lens == [107, 300] and [s for f in feats for s in f.spans] == [29, 77]
    with torch.no_grad():
        mine = omni.encode_audio(mels, lens)
    for b in range(2):
        want = ref.audio_clip(sd64, omni.args.audio.__dict__, mels[b], lens[b])
        assert mine[b].shape == want.shape
        assert (mine[b].double() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


# ------------------------------------------------------------------------------------ whole model
def make_image(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return PIL.fromarray(arr)


@pytest.mark.slow
def test_whole_model_logits_and_greedy_tokens_match_float64_reference(tiny_omni, omni, sd64, cfg, tmp_path):
    """One sliced image (1000 x 700: a source crop and a 2-row grid) and one audio clip in a
    prompt: the engine's prefill logits against the float64 reference built from token ids
    alone, then 8 greedy tokens."""
    import soundfile

    image = tmp_path / "img.png"
    make_image(1000, 700, 5).save(image)
    g = torch.Generator().manual_seed(6)
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, (0.1 * torch.randn(int(1.3 * 16000), generator=g)).numpy(), 16000, subtype="PCM_16")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe both."},
                                             {"type": "image", "image": str(image)},
                                             {"type": "audio", "audio": str(wav)}]}]
    llm = LLM(tiny_omni, device="cpu", dtype="float32")
    ids, embeds = llm.encode_conversation(messages)
    tok = llm.tokenizer
    tokens = {t: tok.token_to_id(t) for t in ("<image>", "</image>", "<audio>", "</audio>")}
    msgs, media = load_messages(messages)
    crops = media[0].image.crops
    assert media[0].image.grid is not None and len(crops) > 2
    mel = media[1].audio
    want_embeds = ref.fused_embeddings(sd64, cfg, ids, crops, [(mel.mels[0], mel.mel_lens[0])], tokens)
    want = ref.llm_logits(sd64, cfg, want_embeds)[-1]

    from test_omni_inputs import first_logprobs

    mine = first_logprobs(llm, ids, embeds)  # through the engine's prefill
    want = want.log_softmax(-1)
    # Log-probabilities of a 256-wide, 2-layer model; compared relative to their scale.
    assert (mine - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())

    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out.token_ids == ref.greedy(sd64, cfg, want_embeds, ids, 8, sd64["llm.model.embed_tokens.weight"])


def test_n_choices_share_one_encoding(tiny_omni, monkeypatch, tmp_path):
    """Encoders run once per request, whatever the number of conversations sharing it."""
    llm = LLM(tiny_omni, device="cpu", dtype="float32")
    make_image(300, 200, 1).save(tmp_path / "a.png")
    calls = []
    orig = llm.model.encode_images
    monkeypatch.setattr(llm.model, "encode_images", lambda crops: calls.append(len(crops)) or orig(crops))
    ids, embeds = llm.encode_conversation([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "a.png")}]}])
    reqs = [llm.engine.add_request(ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                   embeddings=embeds) for _ in range(3)]
    llm.engine.run_to_completion(reqs)
    assert calls == [1]
    assert reqs[0].output_ids == reqs[1].output_ids == reqs[2].output_ids
    assert math.isfinite(float(sum(reqs[0].output_ids)))
