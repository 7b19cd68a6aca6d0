"""Multimodal chat prompts: messages whose content holds text, image and audio parts become
token ids with placeholder runs, plus the encoded vectors that replace those runs.

Content parts (OpenAI style, and the official ``{"text", "image", "audio"}`` dict)::

    {"type": "text", "text": "..."}
    {"type": "image", "image": PATH | bytes | PIL.Image}       {"type": "image_url", "image_url": {"url": URL}}
    {"type": "audio", "audio": PATH | bytes}                   {"type": "input_audio",
                                                                "input_audio": {"data": BASE64, "format": "wav"}}

Layout (the official processor, as far as the public sources show it): inside a user turn,
every image comes first as ``(<image>./</image>)\\n``, then every audio as
``Audio k: (<audio>./</audio>)\\n`` (k counts audios from 1 across the conversation), then
the text. Each marker expands to placeholder tokens:

* image: ``<image>`` + ``<|unk|>`` x query_num + ``</image>`` for the source crop; when the
  image is sliced, ``<slice>`` + the slice rows joined by "\\n" (each cell
  ``<image>`` + ``<|unk|>`` x query_num + ``</image>``) + ``</slice>`` (MiniCPM-V 2.5's
  layout, which the pre-release Megrez-Omni code uses; the released tokenizer's delimiter
  strings are not public, so they are looked up by name and a tokenizer without them is
  refused). The crop's vectors fill the ``<|unk|>`` run.
* audio: ``<audio>`` + ``<|unk|>`` x (n_tok + 2) + ``</audio>`` per 30 s window; the
  window's vectors, learned begin/end vectors included, fill the run (the delimiters keep
  their token embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import MediaError
from .audio import AudioFeatures, audio_features, load_audio
from .image import ImageCrops, decode_base64, decode_data_url, load_image, slice_image

IMAGE_MARKER = "(<image>./</image>)"
AUDIO_MARKER = "(<audio>./</audio>)"
TOKENS = {"unk": "<|unk|>", "image_start": "<image>", "image_end": "</image>", "slice_start": "<slice>",
          "slice_end": "</slice>", "audio_start": "<audio>", "audio_end": "</audio>"}  # = tiny.OMNI_SPECIAL_TOKENS
AUDIO_FORMATS = ("wav", "mp3", "flac", "m4a", "ogg", "webm", "aac", "opus")


@dataclass
class MediaPolicy:
    """Where images may come from. Remote URLs are never fetched; local paths only under the
    allowed directories (the server's ``--allowed-local-media-path``)."""
    allow_paths: bool = True
    allowed_dirs: tuple = ()

    def check_path(self, path: str, where: str) -> str:
        from pathlib import Path

        if not self.allow_paths:
            raise MediaError(f"{where}: local file paths are not accepted by this server (send a data: URL; "
                             f"the server can allow a directory with --allowed-local-media-path)")
        if self.allowed_dirs:
            real = Path(path).expanduser().resolve()
            if not any(real.is_relative_to(Path(d).resolve()) for d in self.allowed_dirs):
                raise MediaError(f"{where}: {path!r} is outside the allowed media directories")
        return path


@dataclass
class Media:
    kind: str                     # "image" | "audio"
    where: str                    # the part it came from, e.g. messages[0].content[1]
    image: ImageCrops | None = None
    audio: AudioFeatures | None = None


@dataclass
class MultimodalPrompt:
    token_ids: list[int]
    media: list[Media] = field(default_factory=list)
    # (start, length, media index, crop/window index) of every placeholder run
    runs: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def multimodal_tokens(self) -> int:
        return sum(n for _, n, _, _ in self.runs)


def has_media(messages) -> bool:
    for m in messages if isinstance(messages, list) else []:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, dict) and (c.get("image") is not None or c.get("audio") is not None):
            return True
        if isinstance(c, list) and any(isinstance(p, dict) and p.get("type", "text") != "text" for p in c):
            return True
    return False


def _read_part(part, where: str, policy: MediaPolicy):
    """(kind, source) of a non-text part."""
    kind = part.get("type")
    if kind == "image":
        src = part.get("image")
        if isinstance(src, str) and not src.startswith("data:"):
            policy.check_path(src, where)
        return "image", src
    if kind == "image_url":
        iu = part.get("image_url")
        url = iu.get("url") if isinstance(iu, dict) else iu
        if not isinstance(url, str):
            raise MediaError(f"{where}.image_url.url: expected a string")
        if url.startswith("data:"):
            return "image", decode_data_url(url, f"{where}.image_url.url")
        if url.startswith(("http://", "https://")):
            raise MediaError(f"{where}.image_url.url: remote URLs are not fetched; send the image as a "
                             f"data: URL (base64)")
        path = url[len("file://"):] if url.startswith("file://") else url
        return "image", policy.check_path(path, f"{where}.image_url.url")
    if kind == "audio":
        src = part.get("audio")
        if isinstance(src, str):
            if src.startswith("data:"):
                return "audio", decode_data_url(src, where, "audio")
            policy.check_path(src, where)
        return "audio", src
    if kind == "input_audio":
        ia = part.get("input_audio")
        if not isinstance(ia, dict) or not isinstance(ia.get("data"), str):
            raise MediaError(f"{where}.input_audio: expected {{'data': BASE64, 'format': 'wav'|'mp3'}}")
        fmt = ia.get("format")
        if fmt is not None and fmt not in AUDIO_FORMATS:
            raise MediaError(f"{where}.input_audio.format: unsupported format {fmt!r} "
                             f"(supported: {', '.join(AUDIO_FORMATS)})")
        return "audio", decode_base64(ia["data"], f"{where}.input_audio.data")
    raise MediaError(f"{where}: unsupported content part type {kind!r} "
                     f"(expected text, image, image_url, audio or input_audio)")


def _parts(content, where: str):
    """A message's content as a list of parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):  # the official {"text", "image", "audio"} form
        parts = []
        for key in ("image", "audio"):
            items = content.get(key)
            for item in items if isinstance(items, list) else ([items] if items is not None else []):
                parts.append({"type": key, key: item})
        if content.get("text") is not None:
            parts.append({"type": "text", "text": content["text"]})
        return parts
    if isinstance(content, list):
        out = []
        for n, p in enumerate(content):
            if isinstance(p, str):
                p = {"type": "text", "text": p}
            if not isinstance(p, dict):
                raise MediaError(f"{where}[{n}]: expected an object, got {type(p).__name__}")
            out.append(p)
        return out
    raise MediaError(f"{where}: expected a string or a list of content parts, got {type(content).__name__}")


def load_messages(messages: list[dict], policy: MediaPolicy | None = None, scale_resolution: int = 448,
                  max_slice_nums: int = 9, patch_size: int = 14, n_mels: int = 128):
    """Messages with text contents (markers in place of media) and the loaded media, in order."""
    policy = policy or MediaPolicy()
    media: list[Media] = []
    out = []
    audio_count = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MediaError(f"messages[{i}]: expected an object")
        where = f"messages[{i}].content"
        parts = _parts(m.get("content"), where)
        images, audios, texts = [], [], []
        for n, part in enumerate(parts):
            pwhere = f"{where}[{n}]" if isinstance(m.get("content"), list) else where
            kind = part.get("type", "text")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise MediaError(f"{pwhere}.text: expected a string")
                for marker in (IMAGE_MARKER, AUDIO_MARKER):
                    if marker in part["text"]:
                        raise MediaError(f"{pwhere}: text may not contain the placeholder {marker!r}")
                texts.append(part["text"])
                continue
            kind, src = _read_part(part, pwhere, policy)
            if m.get("role") != "user":
                raise MediaError(f"{pwhere}: images and audio are accepted in user messages only")
            if kind == "image":
                crops = slice_image(load_image(src, pwhere), scale_resolution, max_slice_nums, patch_size)
                images.append(Media("image", pwhere, image=crops))
            else:
                if n_mels is None:
                    raise MediaError(f"{pwhere}: this model has no audio encoder (it takes images and text)")
                feats = audio_features(load_audio(src, pwhere), n_mels)
                audios.append(Media("audio", pwhere, audio=feats))
        text = "".join(IMAGE_MARKER + "\n" for _ in images)
        for _ in audios:
            audio_count += 1
            text += f"Audio {audio_count}: {AUDIO_MARKER}\n"
        media += images + audios
        out.append({**m, "content": text + "".join(texts)})
    return out, media


class PromptBuilder:
    """Renders the chat template and expands the markers into placeholder token runs."""

    def __init__(self, tokenizer, query_num: int):
        self.tokenizer, self.query_num = tokenizer, query_num
        self._ids: dict[str, int] = {}

    def token(self, name: str) -> int:
        if name not in self._ids:
            tid = self.tokenizer.token_to_id(TOKENS[name])
            if tid is None:
                raise MediaError(f"the tokenizer has no {TOKENS[name]!r} token, which multimodal prompts need; "
                                 f"is this a Megrez-3B-Omni checkpoint?")
            self._ids[name] = tid
        return self._ids[name]

    def _crop_run(self, ids: list[int], runs: list, media_index: int, crop: int) -> None:
        ids.append(self.token("image_start"))
        runs.append((len(ids), self.query_num, media_index, crop))
        ids += [self.token("unk")] * self.query_num
        ids.append(self.token("image_end"))

    def image_ids(self, m: Media, media_index: int, start: int) -> tuple[list[int], list]:
        ids, runs = [], []
        self._crop_run(ids, runs, media_index, 0)
        if m.image.grid is not None:
            cols, rows = m.image.grid
            newline = self.tokenizer.encode("\n", add_special_tokens=False)
            ids.append(self.token("slice_start"))
            for r in range(rows):
                if r:
                    ids += newline
                for c in range(cols):
                    self._crop_run(ids, runs, media_index, 1 + r * cols + c)
            ids.append(self.token("slice_end"))
        return ids, [(start + s, n, mi, c) for s, n, mi, c in runs]

    def audio_ids(self, m: Media, media_index: int, start: int) -> tuple[list[int], list]:
        ids, runs = [], []
        for w, span in enumerate(m.audio.spans):
            ids.append(self.token("audio_start"))
            runs.append((start + len(ids), span, media_index, w))
            ids += [self.token("unk")] * span
            ids.append(self.token("audio_end"))
        return ids, runs

    def build(self, messages: list[dict], media: list[Media], **template_kwargs) -> MultimodalPrompt:
        text = self.tokenizer.apply_chat_template(messages, **template_kwargs)
        ids: list[int] = []
        runs: list = []
        queue = list(enumerate(media))
        pos = 0
        while True:
            hits = [(text.find(mk, pos), mk) for mk in (IMAGE_MARKER, AUDIO_MARKER)]
            hits = [(i, mk) for i, mk in hits if i >= 0]
            if not hits:
                break
            at, marker = min(hits)
            ids += self.tokenizer.encode(text[pos:at], add_special_tokens=False)
            if not queue:
                raise MediaError("the chat template wrote more media markers than there are images and audios")
            index, m = queue.pop(0)
            if (marker == IMAGE_MARKER) != (m.kind == "image"):
                raise MediaError(f"{m.where}: the chat template reordered the media markers")
            piece, piece_runs = (self.image_ids if m.kind == "image" else self.audio_ids)(m, index, len(ids))
            ids += piece
            runs += piece_runs
            pos = at + len(marker)
        ids += self.tokenizer.encode(text[pos:], add_special_tokens=False)
        if queue:
            raise MediaError(f"{queue[0][1].where}: the chat template dropped this part's marker")
        return MultimodalPrompt(ids, media, runs)


class EncoderCache:
    """The encoders' outputs for the last few images and clips, by content: a chat that
    keeps an image in its history, or clients that send the same picture again, pay for
    the encoder once."""

    def __init__(self, size: int = 16):
        import threading
        from collections import OrderedDict

        self.size, self.entries = size, OrderedDict()
        self.hits = 0
        self._lock = threading.Lock()  # the server encodes in several worker threads

    @staticmethod
    def key(m: Media) -> str:
        import hashlib

        h = hashlib.sha256(m.kind.encode())
        tensors = m.image.crops if m.kind == "image" else [m.audio.mels, torch.tensor(m.audio.mel_lens)]
        for t in tensors:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str):
        with self._lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                self.hits += 1
            return hit

    def put(self, key: str, value) -> None:
        with self._lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


def encode_media(model, prompt: MultimodalPrompt, cache: EncoderCache | None = None) -> list[tuple[int, torch.Tensor]]:
    """Run the encoders once over every image crop and audio window of the prompt;
    returns (position, vectors) for each placeholder run, in the model's dtype."""
    vectors: dict[tuple[int, int], torch.Tensor] = {}
    keys = {}
    if cache is not None:
        for i, m in enumerate(prompt.media):
            keys[i] = cache.key(m)
            hit = cache.get(keys[i])
            if hit is not None:
                vectors.update({(i, c): v for c, v in enumerate(hit)})
    todo = [(i, m) for i, m in enumerate(prompt.media) if (i, 0) not in vectors]
    images = [(i, m) for i, m in todo if m.kind == "image"]
    audios = [(i, m) for i, m in todo if m.kind == "audio"]
    if images:
        crops = [c for _, m in images for c in m.image.crops]
        out = model.encode_images(crops)
        k = 0
        for i, m in images:
            for c in range(len(m.image.crops)):
                vectors[(i, c)] = out[k]
                k += 1
    if audios:
        mels = torch.cat([m.audio.mels for _, m in audios])
        lens = [n for _, m in audios for n in m.audio.mel_lens]
        out = model.encode_audio(mels, lens)
        k = 0
        for i, m in audios:
            for w in range(len(m.audio.mel_lens)):
                vectors[(i, w)] = out[k]
                k += 1
    if cache is not None:
        for i, m in todo:
            count = len(m.image.crops) if m.kind == "image" else len(m.audio.mel_lens)
            cache.put(keys[i], [vectors[(i, c)] for c in range(count)])
    result = []
    for start, n, mi, c in prompt.runs:
        v = vectors[(mi, c)]
        if v.shape[0] != n:
            raise MediaError(f"{prompt.media[mi].where}: {v.shape[0]} vectors for {n} placeholder tokens")
        result.append((start, v))
    return result


__all__ = ["MultimodalPrompt", "PromptBuilder", "MediaPolicy", "Media", "load_messages", "encode_media",
           "has_media", "IMAGE_MARKER", "AUDIO_MARKER", "TOKENS"]


def is_multimodal_model(model) -> bool:
    return hasattr(model, "encode_images") and hasattr(model, "encode_audio")


def first_media_part(messages) -> str:
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, dict):
            return f"messages[{i}].content"
        if isinstance(c, list):
            for n, p in enumerate(c):
                if isinstance(p, dict) and p.get("type", "text") != "text":
                    return f"messages[{i}].content[{n}] ({p.get('type')})"
    return "messages"


def prepare_chat(model, tokenizer, messages: list[dict], policy: MediaPolicy | None = None,
                 max_len: int | None = None, cache: EncoderCache | None = None, **template_kwargs):
    """Token ids, placeholder embeddings and the prompt of a conversation with media.
    The encoders run here, once: the result can be shared by every choice of a request."""
    if not is_multimodal_model(model):
        raise MediaError(f"{first_media_part(messages)}: this model takes text only (images and audio need a "
                         f"Megrez-3B-Omni checkpoint, architectures ['MegrezO'])")
    omni = model.args.omni
    n_mels = model.args.audio.n_mels if model.args.audio is not None else None
    msgs, media = load_messages(messages, policy, omni.scale_resolution, omni.max_slice_nums, omni.patch_size,
                                n_mels)
    prompt = PromptBuilder(tokenizer, omni.query_num).build(msgs, media, **template_kwargs)
    if max_len is not None and len(prompt.token_ids) >= max_len:
        per = {}
        for _, n, mi, _ in prompt.runs:
            per[mi] = per.get(mi, 0) + n
        parts = ", ".join(f"{media[mi].where} {media[mi].kind} {n}" for mi, n in per.items())
        raise MediaError(f"the prompt has {len(prompt.token_ids)} tokens but the context holds {max_len} "
                         f"(at least one is needed for the answer): {prompt.multimodal_tokens} are image/audio "
                         f"placeholders ({parts}); send fewer or smaller images or shorter audio",)
    return prompt.token_ids, encode_media(model, prompt, cache), prompt
