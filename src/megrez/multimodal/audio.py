"""Audio: decoding, resampling to 16 kHz mono, and Whisper's 128-bin log-mel features.

Decoding: PyAV (the FFmpeg libraries in its wheel) reads every common format -- wav, flac,
mp3, m4a/aac, ogg/opus, webm -- and resamples with libswresample to mono 16-bit 16 kHz, the
same conversion the official pipeline asks the ffmpeg command line for (``-ac 1 -ar 16000
-f s16le``, then /32768). Without PyAV, soundfile (libsndfile) reads wav, flac, ogg and mp3,
and then only 16 kHz audio is accepted (there is no resampler without PyAV).

Features: 30-second windows (480,000 samples, zero-padded), n_fft 400, hop 160, periodic
Hann window, centred STFT with reflect padding, the last frame dropped, power spectrum,
Slaney mel filterbank (128 bands, 0-8 kHz), log10 clamped at 1e-10 and at max - 8, then
(x + 4) / 4: [128, 3000] per window. Computed in float64.

Long audio: the encoder holds 30 s. The official model truncates longer clips; here a clip
is cut into consecutive 30 s windows and each is encoded on its own, so nothing is dropped
(the model was trained on clips of at most 30 s, so quality past that is not guaranteed).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import MediaError

SAMPLE_RATE = 16000
N_FFT, HOP = 400, 160
WINDOW_SAMPLES = 30 * SAMPLE_RATE
WINDOW_FRAMES = WINDOW_SAMPLES // HOP
MIN_TAIL_SAMPLES = HOP * 4  # a last window shorter than this (40 ms) is dropped
MAX_SECONDS = 20 * 60


def _open(source, where: str):
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source), "the audio data"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise MediaError(f"{where}: audio file {str(path)!r} not found")
        return str(path), repr(str(path))
    raise MediaError(f"{where}: expected an audio path or bytes, got {type(source).__name__}")


def load_audio(source, where: str = "audio") -> torch.Tensor:
    """Mono float32 samples at 16 kHz in [-1, 1) from a path or the file's bytes."""
    import numpy as np

    if isinstance(source, torch.Tensor):
        return source.float().reshape(-1)
    if isinstance(source, np.ndarray):
        return torch.from_numpy(source.astype(np.float32).reshape(-1))
    data, name = _open(source, where)
    try:
        import av  # noqa: F401
    except ModuleNotFoundError:
        samples = _decode_soundfile(data, name, where)
    else:
        samples = _decode_av(data, name, where)
    if samples.numel() == 0:
        raise MediaError(f"{where}: {name} holds no audio samples")
    if samples.numel() > MAX_SECONDS * SAMPLE_RATE:
        raise MediaError(f"{where}: {name} is longer than the limit of {MAX_SECONDS // 60} minutes")
    return samples


def _decode_av(data, name: str, where: str) -> torch.Tensor:
    import av
    import numpy as np

    try:
        container = av.open(data)
    except Exception as e:
        raise MediaError(f"{where}: {name} is not a readable audio file ({type(e).__name__}: {e})") from None
    try:
        if not container.streams.audio:
            raise MediaError(f"{where}: {name} has no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
            if sum(map(len, chunks)) > MAX_SECONDS * SAMPLE_RATE:
                break
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except Exception as e:  # corrupt packets, unsupported codecs
        raise MediaError(f"{where}: {name} cannot be decoded ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)


def _decode_soundfile(data, name: str, where: str) -> torch.Tensor:
    try:
        import soundfile
    except ModuleNotFoundError:
        raise MediaError("audio needs PyAV (all formats) or soundfile (wav/flac/ogg/mp3): "
                         "pip install 'megrez[omni]'") from None
    try:
        samples, rate = soundfile.read(data, dtype="int16", always_2d=True)
    except Exception as e:
        raise MediaError(f"{where}: {name} is not a readable audio file for soundfile ({e}); PyAV reads more "
                         f"formats (m4a/aac among them): pip install av") from None
    if rate != SAMPLE_RATE:
        raise MediaError(f"{where}: {name} is sampled at {rate} Hz; resampling to {SAMPLE_RATE} Hz needs PyAV "
                         f"(pip install av)")
    mono = torch.from_numpy(samples.astype("float32")).mean(dim=1)
    return mono / 32768.0


# ---------------------------------------------------------------------------------- features

def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    return torch.where(log_region, 15.0 + torch.log(f.clamp_min(1e-10) / 1000.0) / (math.log(6.4) / 27.0), mel)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    f = 200.0 * m / 3.0
    return torch.where(m >= 15.0, 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0)), f)


def mel_filters(n_mels: int = 128, n_fft: int = N_FFT, sr: int = SAMPLE_RATE, fmax: float = 8000.0) -> torch.Tensor:
    """[n_fft//2 + 1, n_mels] float64 Slaney-normalised triangular filters (librosa's ``mel``)."""
    fft_freqs = torch.linspace(0, sr // 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(float(hz_to_mel(torch.tensor(0.0, dtype=torch.float64))),
                          float(hz_to_mel(torch.tensor(fmax, dtype=torch.float64))), n_mels + 2, dtype=torch.float64)
    freqs = mel_to_hz(mels)
    diff = freqs[1:] - freqs[:-1]
    slopes = freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = torch.clamp(torch.minimum(down, up), min=0.0)
    return filters * (2.0 / (freqs[2:n_mels + 2] - freqs[:n_mels]))[None, :]


_FILTERS: dict[int, torch.Tensor] = {}


def log_mel(window: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """[samples] (at most 30 s; zero-padded to 30 s here) -> [n_mels, 3000] float32."""
    if n_mels not in _FILTERS:
        _FILTERS[n_mels] = mel_filters(n_mels)
    x = torch.zeros(WINDOW_SAMPLES, dtype=torch.float64)
    x[: window.numel()] = window.double()[:WINDOW_SAMPLES]
    stft = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT, periodic=True, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True)
    power = stft[:, :-1].abs() ** 2                                  # [201, 3000]
    mel = _FILTERS[n_mels].T @ power                                 # [n_mels, 3000]
    log_spec = mel.clamp_min(1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).float()


@dataclass
class AudioFeatures:
    mels: torch.Tensor        # [windows, n_mels, 3000] float32
    mel_lens: list[int]       # valid mel frames of each window
    seconds: float

    @property
    def spans(self) -> list[int]:
        """Placeholder tokens of each window: 25 per second plus the begin/end vectors."""
        from ..models.omni.audio import encoder_lengths

        return [encoder_lengths(n)[1] + 2 for n in self.mel_lens]


def audio_features(samples: torch.Tensor, n_mels: int = 128) -> AudioFeatures:
    """Split 16 kHz samples into 30 s windows and compute each one's log-mel features."""
    n = samples.numel()
    starts = list(range(0, n, WINDOW_SAMPLES))
    if len(starts) > 1 and n - starts[-1] < MIN_TAIL_SAMPLES:
        starts.pop()  # a few milliseconds past a window boundary: nothing to hear
    windows = [samples[s:s + WINDOW_SAMPLES] for s in starts]
    lens = [max(w.numel() // HOP, 1) for w in windows]
    return AudioFeatures(torch.stack([log_mel(w, n_mels) for w in windows]), lens, n / SAMPLE_RATE)


__all__ = ["load_audio", "audio_features", "log_mel", "mel_filters", "AudioFeatures", "SAMPLE_RATE"]
