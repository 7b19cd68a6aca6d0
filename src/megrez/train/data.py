"""Training data: read documents and conversations, tokenise, pack into fixed-length rows, and
iterate over batches from a position that can be saved and restored.

A packed row holds several documents side by side. Every token carries the id of its document
(``doc_ids``), which the model turns into block-diagonal causal attention with positions
restarting at each document (see ``train.attention``); a target counts only when it belongs to
the same document as its input, so nothing is learned across a boundary.

Pre-training text: ``.txt`` files (documents separated by blank lines) or ``.jsonl`` files
(one ``{"text": ...}`` object a line). SFT: ``.jsonl`` files with ``{"messages": [...]}``;
only assistant tokens (the reply and its end-of-turn token) carry loss, and every assistant
turn gets an id for the turn-level loss.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tokenizer import Tokenizer, normalize_messages

PAD_DOC = -1  # doc id of padding: attends only to other padding and never carries loss
NO_TURN = -1


class DataError(ValueError):
    """Training data cannot be used; the message names the file and line."""


# ------------------------------------------------------------------------------------- reading

def read_documents(paths: list[str | Path], text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix == ".jsonl":
            for lineno, obj in _jsonl(path):
                text = obj.get(text_field)
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: expected a string field {text_field!r}, "
                                    f"got {type(text).__name__ if text is not None else 'nothing'}")
                if text.strip():
                    docs.append(text)
        elif path.suffix in (".txt", ".md", ""):
            text = _read_text(path)
            block: list[str] = []
            for line in text.splitlines() + [""]:
                if line.strip():
                    block.append(line)
                elif block:
                    docs.append("\n".join(block))
                    block = []
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .txt or .jsonl)")
    if not docs:
        raise DataError(f"no documents found in {', '.join(map(str, paths))}")
    return docs


def read_conversations(paths: list[str | Path]) -> list[tuple[str, list[dict]]]:
    """(where, messages) for every line of the chat ``.jsonl`` files; ``where`` is ``file:line``."""
    convs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: SFT data must be .jsonl with a 'messages' list per line")
        for lineno, obj in _jsonl(path):
            messages = obj.get("messages")
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{path}:{lineno}: expected a non-empty list field 'messages'")
            convs.append((f"{path}:{lineno}", messages))
    if not convs:
        raise DataError(f"no conversations found in {', '.join(map(str, paths))}")
    return convs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _jsonl(path: Path):
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


# ---------------------------------------------------------------------------------- tokenising

def end_of_document_id(tok: Tokenizer) -> int:
    for token in ("<|eos|>", tok.eos_token):
        if token and tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
    raise DataError("the tokenizer has no end-of-document token (<|eos|> or eos_token in tokenizer_config.json)")


def tokenize_documents(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    """Each document's ids followed by the end-of-document token, so the model learns to stop."""
    eod = end_of_document_id(tok)
    return [enc.ids + [eod] for enc in tok.hf.encode_batch(docs, add_special_tokens=False)]


def render_conversation(tok: Tokenizer, messages: list[dict], where: str = "conversation"):
    """Chat-template token ids of a conversation, with ``mask`` (1 on assistant tokens: the reply
    and whatever the template closes it with, e.g. ``<|turn_end|>``) and ``turns`` (the index of
    the assistant turn a token belongs to, -1 elsewhere).

    The text before each reply is tokenised on its own, exactly as the engine tokenises a
    prompt, so training sees the token boundaries that generation will see."""
    try:
        msgs = normalize_messages(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    ids: list[int] = []
    mask: list[int] = []
    turns: list[int] = []
    done = ""  # rendered text already turned into ids
    turn = 0

    def add(text: str, label: int, turn_id: int):
        piece = tok.encode(text, add_special_tokens=False)
        ids.extend(piece)
        mask.extend([label] * len(piece))
        turns.extend([turn_id] * len(piece))

    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: messages[0] is an assistant message; a conversation must start "
                            f"with a system or user message")
        prompt = tok.apply_chat_template(msgs[:i], add_generation_prompt=True)
        upto = tok.apply_chat_template(msgs[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render messages[{i}] as a continuation of "
                            f"the earlier messages, so assistant tokens cannot be located")
        add(prompt[len(done):], 0, NO_TURN)
        add(upto[len(prompt):], 1, turn)
        done, turn = upto, turn + 1
    if turn == 0:
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    full = tok.apply_chat_template(msgs, add_generation_prompt=False)
    if full[len(done):]:
        add(full[len(done):], 0, NO_TURN)
    return ids, mask, turns


# ------------------------------------------------------------------------------------- packing

@dataclass
class Rows:
    """Packed rows of ``seq_len + 1`` tokens (inputs are ``[:-1]``, targets ``[1:]``)."""
    tokens: torch.Tensor   # [R, T+1] int64
    docs: torch.Tensor     # [R, T+1] document id, PAD_DOC on padding
    mask: torch.Tensor     # [R, T+1] bool: token may be a target
    turns: torch.Tensor    # [R, T+1] assistant turn id (unique within a row), NO_TURN elsewhere

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class Batch:
    inputs: torch.Tensor    # [B, T]
    targets: torch.Tensor   # [B, T]
    doc_ids: torch.Tensor   # [B, T] document of each input token
    loss_mask: torch.Tensor  # [B, T] bool: this target is learned
    turn_ids: torch.Tensor  # [B, T] turn of each target, NO_TURN where no loss

    @classmethod
    def from_rows(cls, rows: Rows, index) -> "Batch":
        tok, doc, mask, turn = rows.tokens[index], rows.docs[index], rows.mask[index], rows.turns[index]
        # A target is learned only inside its input's document (never across a boundary or padding).
        same = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] != PAD_DOC)
        loss_mask = mask[:, 1:] & same
        turn_ids = torch.where(loss_mask, turn[:, 1:], torch.full_like(turn[:, 1:], NO_TURN))
        return cls(tok[:, :-1], tok[:, 1:], doc[:, :-1], loss_mask, turn_ids)

    @property
    def num_tokens(self) -> int:
        return self.inputs.numel()

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.inputs, self.targets, self.doc_ids, self.loss_mask, self.turn_ids)))


def pack_stream(docs: list[list[int]], seq_len: int) -> Rows:
    """Pre-training packing: concatenate the documents and cut rows of ``seq_len + 1`` tokens that
    overlap by one, so every token is a target once. A document that does not fit continues in
    the next row (from position 0 there)."""
    n = sum(map(len, docs))
    if n < seq_len + 1:
        raise DataError(f"only {n} tokens of data, fewer than one row of seq_len+1={seq_len + 1}")
    tokens = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    doc_of = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(list(map(len, docs))))
    r = (n - 1) // seq_len
    idx = torch.arange(r)[:, None] * seq_len + torch.arange(seq_len + 1)  # [R, T+1]
    ones = torch.ones(r, seq_len + 1, dtype=torch.bool)
    return Rows(tokens[idx], doc_of[idx], ones, torch.full((r, seq_len + 1), NO_TURN))


def pack_examples(examples: list[tuple[list[int], list[int], list[int]]], seq_len: int, pad_id: int) -> Rows:
    """SFT packing: whole examples ``(ids, mask, turns)`` are placed in order into rows of
    ``seq_len + 1`` tokens, never split; a row is closed (and padded) when the next example does
    not fit. Examples longer than a row are truncated."""
    width = seq_len + 1
    rows_tok, rows_doc, rows_mask, rows_turn = [], [], [], []
    cur: list[list[int]] = [[], [], [], []]

    def close():
        pad = width - len(cur[0])
        rows_tok.append(cur[0] + [pad_id] * pad)
        rows_doc.append(cur[1] + [PAD_DOC] * pad)
        rows_mask.append(cur[2] + [0] * pad)
        rows_turn.append(cur[3] + [NO_TURN] * pad)
        cur[:] = [[], [], [], []]

    for ids, mask, turns in examples:
        ids, mask, turns = ids[:width], mask[:width], turns[:width]
        if len(cur[0]) + len(ids) > width:
            close()
        slot = len(set(cur[1]))  # the example's index within its row
        # Turn ids must be unique within the row: offset by the turns already placed there.
        base = max((t for t in cur[3] if t != NO_TURN), default=-1) + 1
        cur[0] += ids
        cur[1] += [slot] * len(ids)
        cur[2] += mask
        cur[3] += [t + base if t != NO_TURN else NO_TURN for t in turns]
    if cur[0]:
        close()
    return Rows(torch.tensor(rows_tok), torch.tensor(rows_doc), torch.tensor(rows_mask, dtype=torch.bool),
                torch.tensor(rows_turn))


# --------------------------------------------------------------------------------- iteration

def shuffled(items: list, seed: int, epoch: int) -> list:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [items[i] for i in torch.randperm(len(items), generator=g).tolist()]


class PretrainSource:
    """Documents (already tokenised) -> packed rows for any epoch, in a per-epoch shuffled order."""

    def __init__(self, docs: list[list[int]], seq_len: int, seed: int, shuffle: bool = True):
        self.docs, self.seq_len, self.seed, self.shuffle = docs, seq_len, seed, shuffle

    def epoch_rows(self, epoch: int) -> Rows:
        docs = shuffled(self.docs, self.seed, epoch) if self.shuffle else self.docs
        return pack_stream(docs, self.seq_len)

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.docs))


class SFTSource:
    def __init__(self, examples, seq_len: int, pad_id: int, seed: int, shuffle: bool = True):
        self.examples, self.seq_len, self.pad_id, self.seed, self.shuffle = examples, seq_len, pad_id, seed, shuffle
        self.truncated = sum(1 for e in examples if len(e[0]) > seq_len + 1)

    def epoch_rows(self, epoch: int) -> Rows:
        ex = shuffled(self.examples, self.seed, epoch) if self.shuffle else self.examples
        return pack_examples(ex, self.seq_len, self.pad_id)

    @property
    def num_tokens(self) -> int:
        return sum(len(e[0]) for e in self.examples)


class Loader:
    """Batches of ``batch_size`` rows for this rank out of global batches of
    ``batch_size * world`` rows. The position (epoch, row) is all it needs to resume exactly:
    an epoch's rows are a pure function of the source, the seed and the epoch number."""

    def __init__(self, source, batch_size: int, rank: int = 0, world: int = 1):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world
        self.epoch, self.row = 0, 0
        self._rows: Rows | None = None
        self._rows_epoch = -1

    def rows(self) -> Rows:
        if self._rows_epoch != self.epoch:
            self._rows, self._rows_epoch = self.source.epoch_rows(self.epoch), self.epoch
            if len(self._rows) < self.batch_size * self.world:
                raise DataError(f"an epoch has {len(self._rows)} rows, fewer than one global batch "
                                f"({self.batch_size} x {self.world} ranks); use less batch or more data")
        return self._rows

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows()) // (self.batch_size * self.world)

    def next_batch(self) -> Batch:
        g = self.batch_size * self.world
        if self.row + g > len(self.rows()):
            self.epoch, self.row = self.epoch + 1, 0  # the remainder of the epoch is dropped
        start = self.row + self.rank * self.batch_size
        batch = Batch.from_rows(self.rows(), slice(start, start + self.batch_size))
        self.row += g
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A fixed random ``fraction`` of the items held out for validation (at least one)."""
    if fraction <= 0:
        return items, []
    order = shuffled(list(range(len(items))), seed, -1)
    n_val = max(1, int(round(len(items) * fraction)))
    if n_val >= len(items):
        raise DataError(f"val_fraction={fraction} leaves no training data out of {len(items)} items")
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
