"""Megrez-3B-Omni inputs: slicing, placeholder layout and insertion rules, audio decoding,
and the errors a user sees."""
import base64
import io

import pytest
import torch

from megrez import LLM, SamplingParams
from megrez.multimodal import MediaError
from megrez.multimodal.audio import SAMPLE_RATE, audio_features, load_audio
from megrez.multimodal.image import load_image, slice_image
from megrez.multimodal.prompt import PromptBuilder, encode_media, load_messages

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def llm(tiny_omni):
    return LLM(tiny_omni, device="cpu", dtype="float32")


def solid(w, h, colour=(200, 30, 30)):
    return PIL.new("RGB", (w, h), colour)


# ------------------------------------------------------------------------------------ slicing
@pytest.mark.parametrize("size,grid,source,cell,tokens", [
    ((720, 1480), [2, 3], (308, 644), (378, 518), 7 * 64),   # the speed table's image: 448 tokens
    ((1000, 1000), [2, 2], (448, 448), None, 5 * 64),         # 320 tokens
    ((448, 448), None, (448, 448), None, 64),
    ((100, 50), None, None, None, 64),                        # small images are upscaled, never sliced
])
def test_slicing_scheme(size, grid, source, cell, tokens):
    crops = slice_image(solid(*size))
    assert crops.grid == grid
    assert len(crops.crops) * 64 == tokens
    if source:
        assert tuple(crops.crops[0].shape[1:][::-1]) == source
    if cell:
        assert all(tuple(c.shape[1:][::-1]) == cell for c in crops.crops[1:])
    assert all(c.shape[1] % 14 == 0 and c.shape[2] % 14 == 0 for c in crops.crops)


def test_slices_are_row_major_top_row_first():
    """A 2 x 2 image of four colours: slices come top-left, top-right, bottom-left, bottom-right."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    img = PIL.new("RGB", (1000, 1000))
    for k, c in enumerate(colours):
        img.paste(c, ((k % 2) * 500, (k // 2) * 500, (k % 2) * 500 + 500, (k // 2) * 500 + 500))
    crops = slice_image(img)
    assert crops.grid == [2, 2]
    for k, c in enumerate(colours):
        centre = crops.crops[1 + k][:, crops.crops[1 + k].shape[1] // 2, crops.crops[1 + k].shape[2] // 2]
        assert centre.tolist() == list(c), k


def test_exif_orientation_is_applied(tmp_path):
    img = solid(40, 20)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


# ------------------------------------------------------------------------------------ prompt layout
def test_image_placeholders_and_insertion_positions(llm):
    """Source crop then the slice grid: <image> unk*Q </image> per crop, rows joined by a
    newline inside <slice>...</slice>; each crop's vectors fill exactly its unk run."""
    tok, q = llm.tokenizer, llm.model.args.omni.query_num
    msgs, media = load_messages([{"role": "user", "content": [{"type": "image", "image": solid(1000, 700)},
                                                              {"type": "text", "text": "hi"}]}])
    prompt = PromptBuilder(tok, q).build(msgs, media)
    ids = prompt.token_ids
    unk, im0, im1 = tok.token_to_id("<|unk|>"), tok.token_to_id("<image>"), tok.token_to_id("</image>")
    cols, rows = media[0].image.grid
    assert len(prompt.runs) == 1 + cols * rows
    for n, (start, length, mi, crop) in enumerate(prompt.runs):
        assert (mi, crop, length) == (0, n, q)
        assert ids[start - 1] == im0 and ids[start + length] == im1
        assert ids[start:start + length] == [unk] * q
    assert ids.count(unk) == q * (1 + cols * rows)
    s0, s1 = ids.index(tok.token_to_id("<slice>")), ids.index(tok.token_to_id("</slice>"))
    inside = tok.decode(ids[s0 + 1:s1], skip_special_tokens=True)
    assert inside.count("\n") == rows - 1
    embeds = encode_media(llm.model, prompt)
    crops_out = llm.model.encode_images(media[0].image.crops)
    for (start, v), run, k in zip(embeds, prompt.runs, range(len(embeds))):
        assert start == run[0] and torch.equal(v, crops_out[k])


def test_audio_placeholders_begin_end_vectors_and_numbering(llm):
    """Audio k: <audio> unk*(n_tok+2) </audio>; the run starts right after <audio>, its first
    and last vectors are the learned begin/end vectors, the delimiters keep their text
    embeddings; k counts audios across the conversation; 1 s -> 27 tokens."""
    tok, q = llm.tokenizer, llm.model.args.omni.query_num
    one_second = torch.zeros(SAMPLE_RATE)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": one_second}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "audio", "audio": torch.zeros(10 * SAMPLE_RATE)}]}]
    msgs, media = load_messages(conv)
    assert "Audio 1: " in msgs[0]["content"] and "Audio 2: " in msgs[2]["content"]
    prompt = PromptBuilder(tok, q).build(msgs, media)
    assert [n for _, n, _, _ in prompt.runs] == [27, 252]
    a0, a1 = tok.token_to_id("<audio>"), tok.token_to_id("</audio>")
    ids = prompt.token_ids
    for start, n, _, _ in prompt.runs:
        assert ids[start - 1] == a0 and ids[start + n] == a1
    bos, eos = llm.model.audio.audio.audio_bos_eos_token.weight
    for start, v in encode_media(llm.model, prompt):
        assert torch.equal(v[0], bos) and torch.equal(v[-1], eos)


def test_order_within_a_turn_is_images_audio_text(llm):
    msgs, _ = load_messages([{"role": "user", "content": [{"type": "text", "text": "Q?"},
                                                          {"type": "audio", "audio": torch.zeros(1600)},
                                                          {"type": "image", "image": solid(50, 50)}]}])
    assert msgs[0]["content"] == "(<image>./</image>)\nAudio 1: (<audio>./</audio>)\nQ?"


def test_long_audio_is_split_into_30s_windows():
    feats = audio_features(torch.zeros(65 * SAMPLE_RATE))
    assert feats.mels.shape == (3, 128, 3000) and feats.mel_lens == [3000, 3000, 500]
    assert feats.spans == [752, 752, 127]


def test_inserted_vectors_change_the_answer_only_through_their_positions(llm):
    """Moving the image vectors one position off (a broken insertion rule) changes the logits."""
    ids, embeds = llm.encode_conversation([{"role": "user", "content": [{"type": "image", "image": solid(60, 60)}]}])
    right = first_logprobs(llm, ids, embeds)
    shifted = first_logprobs(llm, ids, [(p + 1, v[:-1]) for p, v in embeds])
    assert (right - shifted).abs().max() > 1e-3
    assert torch.allclose(right, first_logprobs(llm, ids, embeds), atol=1e-5)


def first_logprobs(llm, ids, embeds) -> torch.Tensor:
    """The engine's log-probabilities of the first answer token (all of the vocabulary)."""
    vocab = llm.model.args.vocab_size
    out = llm._run([ids], [SamplingParams(temperature=0, max_tokens=1, logprobs=vocab)], True, [embeds])
    lp = torch.full((vocab,), float("nan"), dtype=torch.float64)
    for token, value in out.logprobs[0].top_logprobs:
        lp[token] = value
    return lp


# ------------------------------------------------------------------------------------ audio decoding
def test_decoding_wav_flac_mp3_m4a_agree(tmp_path):
    """PyAV decodes and resamples every format to mono 16 kHz; a 44.1 kHz stereo tone comes out
    at 16 kHz with the same pitch in every container (lossy codecs within their noise)."""
    av = pytest.importorskip("av")
    import numpy as np

    t = np.arange(44100) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([tone, tone])
    results = {}
    for ext, codec in (("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "mp3"), ("m4a", "aac")):
        path = tmp_path / f"tone.{ext}"
        with av.open(str(path), "w") as out:
            stream = out.add_stream(codec, rate=44100, layout="stereo")
            frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
            frame.sample_rate = 44100
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        results[ext] = load_audio(path)
    for ext, x in results.items():
        assert abs(x.numel() - 16000) < 2100, ext  # codec padding/priming at most a frame or two
        spectrum = torch.fft.rfft(x[:8000]).abs()
        assert abs(int(spectrum.argmax()) * 16000 / 8000 - 440) <= 4, ext


# ------------------------------------------------------------------------------------ errors
def test_unreadable_image_names_the_part(llm):
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[1\].*not a readable image"):
        llm.chat([{"role": "user", "content": [{"type": "text", "text": "x"},
                                               {"type": "image", "image": b"not an image"}]}])


def test_missing_file_and_unsupported_audio(llm, tmp_path):
    with pytest.raises(MediaError, match=r"content\[0\].*not found"):
        llm.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "none.png")}]}])
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(MediaError, match=r"content\[0\].*(not a readable audio|cannot be decoded)"):
        llm.chat([{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "a.txt")}]}])
    with pytest.raises(MediaError, match=r"input_audio\.format: unsupported format 'xyz'"):
        llm.chat([{"role": "user", "content": [{"type": "input_audio",
                                                "input_audio": {"data": "AAAA", "format": "xyz"}}]}])
    with pytest.raises(MediaError, match="unsupported content part type 'video'"):
        llm.chat([{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}])


def test_image_on_a_text_only_model(tiny_dense):
    text_llm = LLM(tiny_dense, device="cpu", dtype="float32")
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[0\] \(image\): this model takes text only"):
        text_llm.chat([{"role": "user", "content": [{"type": "image", "image": solid(10, 10)}]}])


def test_too_many_images_for_the_context(tiny_omni):
    small = LLM(tiny_omni, device="cpu", dtype="float32", max_model_len=256)
    parts = [{"type": "image", "image": solid(1000, 1000)} for _ in range(3)]
    with pytest.raises(MediaError, match=r"context holds 256.*messages\[0\]\.content\[0\] image 80"):
        small.chat([{"role": "user", "content": parts}])


def test_data_url_and_remote_url(llm):
    buf = io.BytesIO()
    solid(30, 30).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    out = llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                   SamplingParams(max_tokens=2, temperature=0))
    assert out.prompt_tokens > 16
    with pytest.raises(MediaError, match="remote URLs are not fetched"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])


def test_an_image_kept_in_the_conversation_is_encoded_once(tiny_omni, monkeypatch):
    chat = LLM(tiny_omni, device="cpu", dtype="float32")
    calls = []
    orig = chat.model.encode_images
    monkeypatch.setattr(chat.model, "encode_images", lambda crops: calls.append(len(crops)) or orig(crops))
    conv = [{"role": "user", "content": [{"type": "image", "image": solid(500, 500)}, {"type": "text", "text": "a"}]}]
    first = chat.encode_conversation(conv)
    conv += [{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    second = chat.encode_conversation(conv)
    assert calls == [len(slice_image(solid(500, 500)).crops)]  # the source crop and its slices, once
    assert torch.equal(first[1][0][1], second[1][0][1]) and first[1][0][0] == second[1][0][0]


def test_prefill_chunks_that_split_an_image_run_change_nothing(tiny_omni, llm):
    """Chunked prefill writes each chunk's share of the image vectors: a chunk size that cuts
    through the placeholder runs gives the same first-token distribution and greedy tokens."""
    chunked = LLM(tiny_omni, device="cpu", dtype="float32", prefill_chunk=7)
    conv = [{"role": "user", "content": [{"type": "image", "image": solid(700, 500)},
                                         {"type": "audio", "audio": torch.zeros(8000)},
                                         {"type": "text", "text": "Describe."}]}]
    ids, embeds = llm.encode_conversation(conv)
    assert torch.allclose(first_logprobs(llm, ids, embeds), first_logprobs(chunked, ids, embeds), atol=1e-4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert llm.chat(conv, params).token_ids == chunked.chat(conv, params).token_ids
