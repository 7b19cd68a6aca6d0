"""Images and audio in ``megrez chat``: ``--image``/``--audio`` and the ``/image FILE``,
``/audio FILE`` commands attach files to the next message."""
from __future__ import annotations

from pathlib import Path

from ..chat import ChatSession, command


def default_omni_model() -> str | None:
    """The small omni model shipped with the package, when there is one."""
    shipped = Path(__file__).resolve().parent.parent / "assets" / "megrez2-tiny-omni"
    return str(shipped) if (shipped / "config.json").is_file() else None


def media_part(kind: str, path: str, flag: str) -> dict:
    path = str(Path(path.strip()).expanduser())
    if not path:
        raise ValueError(f"usage: {flag} FILE")
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")
    return {"type": kind, kind: path}


def media_parts(images=(), audios=()) -> list[dict]:
    return [media_part("image", p, "--image") for p in images or []] + \
        [media_part("audio", p, "--audio") for p in audios or []]


def _attach(session: ChatSession, kind: str, arg: str) -> None:
    from .prompt import is_multimodal_model

    if not is_multimodal_model(session.llm.model):
        raise ValueError(f"/{kind} needs a Megrez-3B-Omni checkpoint; this model takes text only")
    session.pending_parts.append(media_part(kind, arg, f"/{kind}"))
    session.notice(f"{kind} {arg.strip()} attached to your next message")


@command("image", usage="/image FILE", help="attach an image to the next message (Megrez-3B-Omni)")
def _image(session: ChatSession, arg: str) -> None:
    _attach(session, "image", arg)


@command("audio", usage="/audio FILE", help="attach an audio file to the next message (Megrez-3B-Omni)")
def _audio(session: ChatSession, arg: str) -> None:
    _attach(session, "audio", arg)
