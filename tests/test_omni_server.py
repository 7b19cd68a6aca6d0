"""The OpenAI server with Megrez-3B-Omni: image_url and input_audio content parts."""
import base64
import io
import socket
import threading

import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")
PIL = pytest.importorskip("PIL.Image")

from test_server import wait_healthy  # noqa: E402

from megrez.engine import Engine  # noqa: E402
from megrez.loading import load_model  # noqa: E402
from megrez.server.app import ServerConfig, create_app  # noqa: E402
from megrez.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    PIL.new("RGB", (600, 500), (10, 200, 30)).save(d / "green.png")
    return d


@pytest.fixture(scope="module")
def server(tiny_omni, media_dir):
    engine = Engine(load_model(tiny_omni, device="cpu"), Tokenizer(tiny_omni), max_num_seqs=4, max_model_len=1024)
    app = create_app(engine, ServerConfig(["omni"], allowed_media_dirs=(str(media_dir),)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_healthy(url)
    yield url, app, engine
    srv.should_exit = True
    thread.join(10)


def png_data_url(colour=(200, 30, 30), size=(40, 30)) -> str:
    buf = io.BytesIO()
    PIL.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_b64(seconds=1.0) -> str:
    import numpy as np
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def chat(url, content, **extra):
    body = {"model": "omni", "messages": [{"role": "user", "content": content}], "max_tokens": 3,
            "temperature": 0, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def test_image_and_audio_parts_with_usage_and_n(server, monkeypatch):
    url, app, engine = server
    calls = []
    orig = engine.model.encode_images
    monkeypatch.setattr(engine.model, "encode_images", lambda crops: calls.append(len(crops)) or orig(crops))
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}},
               {"type": "input_audio", "input_audio": {"data": wav_b64(1.0), "format": "wav"}},
               {"type": "text", "text": "What do you see and hear?"}]
    r = chat(url, content, n=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 3
    assert calls == [1]  # encoded once for the three choices
    q = engine.model.args.omni.query_num
    text_only = chat(url, "What do you see and hear?").json()["usage"]["prompt_tokens"]
    # The image's placeholders and delimiters, the audio's 27 + 2, and their marker text.
    assert body["usage"]["prompt_tokens"] >= text_only + q + 2 + 27 + 2


def test_local_paths_only_inside_the_allowed_directory(server, media_dir, tmp_path):
    url, _, _ = server
    ok = chat(url, [{"type": "image_url", "image_url": {"url": f"file://{media_dir / 'green.png'}"}}])
    assert ok.status_code == 200, ok.text
    PIL.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    r = chat(url, [{"type": "image_url", "image_url": {"url": str(tmp_path / "outside.png")}}])
    assert r.status_code == 400 and "outside the allowed media directories" in r.json()["error"]["message"]


@pytest.mark.parametrize("part,param,message", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, "messages[0].content[0]",
     "not a readable image"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "messages[0].content[0].image_url.url",
     "remote URLs are not fetched"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"junk" * 50).decode(), "format": "mp3"}},
     "messages[0].content[0]", "audio"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "midi"}},
     "messages[0].content[0].input_audio.format", "unsupported format"),
    ({"type": "video_url", "video_url": {"url": "x"}}, "messages[0].content", "unsupported content part type"),
])
def test_bad_media_is_a_400_naming_the_part(server, part, param, message):
    url, _, _ = server
    r = chat(url, [part, {"type": "image_url", "image_url": {"url": png_data_url()}}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"]
    assert chat(url, "still fine?").status_code == 200  # one bad request hurts nobody


def test_too_many_images_for_the_context(server):
    url, _, _ = server
    parts = [{"type": "image_url", "image_url": {"url": png_data_url(size=(1400, 1400))}} for _ in range(6)]
    r = chat(url, parts)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "image" in r.json()["error"]["message"]


def test_image_on_a_text_only_model_is_a_400(tiny_dense):
    from megrez.server.app import OpenAIServer
    from megrez.server.protocol import APIError, Limits, parse_chat

    engine = Engine(load_model(tiny_dense, device="cpu"), Tokenizer(tiny_dense), max_num_seqs=1, max_model_len=256)
    server = OpenAIServer(engine, ServerConfig(["dense"]))
    req = parse_chat({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": png_data_url()}}]}]},
        Limits(), engine.model.args.vocab_size)
    with pytest.raises(APIError) as e:
        server.encode_with_media(req)
    assert e.value.status == 400 and e.value.param == "messages[0].content[1]"
    assert "this model takes text only" in e.value.message
