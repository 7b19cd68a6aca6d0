"""Images and audio in ``megrez chat``: ``--image``/``--audio`` and the in-chat ``/image PATH``,
``/audio PATH`` commands queue files that are attached to the next message."""
from __future__ import annotations

import sys
from pathlib import Path


def default_omni_model() -> str | None:
    """The small omni model shipped with the package, when there is one."""
    shipped = Path(__file__).resolve().parent.parent / "assets" / "megrez2-tiny-omni"
    return str(shipped) if (shipped / "config.json").is_file() else None


class MediaQueue:
    def __init__(self, images=(), audios=()):
        self.parts: list[dict] = []
        for path in images or []:
            self.add("image", path)
        for path in audios or []:
            self.add("audio", path)

    def __bool__(self) -> bool:
        return bool(self.parts)

    @staticmethod
    def supported(llm) -> bool:
        from .prompt import is_multimodal_model

        return is_multimodal_model(llm.model)

    def add(self, kind: str, path: str) -> None:
        path = str(Path(path).expanduser())
        if not Path(path).is_file():
            raise ValueError(f"--{kind} {path}: no such file")
        self.parts.append({"type": kind, kind: path})

    def clear(self) -> None:
        self.parts = []

    def command(self, line: str) -> bool:
        """Handle ``/image PATH`` and ``/audio PATH``; True when the line was one."""
        for kind in ("image", "audio"):
            if line == f"/{kind}" or line.startswith(f"/{kind} "):
                path = line[len(kind) + 1:].strip()
                if not path:
                    print(f"usage: /{kind} PATH", file=sys.stderr)
                    return True
                try:
                    self.add(kind, path)
                except ValueError as e:
                    print(f"megrez: error: {str(e).replace('--', '/', 1)}", file=sys.stderr)
                    return True
                print(f"({kind} {path} attached to your next message)", file=sys.stderr)
                return True
        return False

    def content(self, text: str):
        """The next user message's content: queued media first, then the text."""
        if not self.parts:
            return text
        parts, self.parts = self.parts + [{"type": "text", "text": text}], []
        return parts
