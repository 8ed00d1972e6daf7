"""Training data: text packed into fixed-length sequences, and supervised conversations masked to the
assistant's tokens, each with a held-out split and a deterministic order for a seed.

Text comes from every source `slm eval` reads (slmkit.eval.data.read_text). Supervised records are Alpaca
(`instruction` / `input` / `output`, a .json list or .jsonl) or chat (`messages` in OpenAI's format, .jsonl),
rendered with the model's own chat template. Which tokens train is found by rendering prefixes of the
conversation and tokenizing each difference on its own, the way the model meets them at inference (the prompt
tokenized as a whole, the reply generated token by token): no template markers are assumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SlmError, require
from ..eval.data import read_jsonl, read_text, resolve_source
from ..tokenizer import Tokenizer
from .objectives import IGNORE, Batch

FORMATS = ("text", "alpaca", "chat")
CHUNK_CHARS = 1 << 16  # text is tokenized in pieces of about this size, cut after blank lines


@dataclass
class Sequences:
    """Training sequences: a packed [N, L+1] tensor (every token a target), or 1-D token tensors of up to
    L+1 tokens with a bool target mask each (padded per micro-batch to the longest)."""

    ids: torch.Tensor | list[torch.Tensor]
    targets: list[torch.Tensor] | None = None
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> Batch:
        if isinstance(self.ids, torch.Tensor):
            x = self.ids[indices]  # [B, L+1]
            return Batch(x[:, :-1], x[:, 1:], torch.tensor(indices))
        width = max(len(self.ids[i]) for i in indices) - 1
        inputs = torch.full((len(indices), width), self.pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)  # [B, T]
        for row, i in enumerate(indices):
            ids, mask = self.ids[i], self.targets[i]
            n = len(ids) - 1
            inputs[row, :n] = ids[:-1]
            labels[row, :n] = torch.where(mask[1:], ids[1:], IGNORE)  # padding stays IGNORE by position
        return Batch(inputs, labels, torch.tensor(indices))

    def target_tokens(self) -> int:
        if self.targets is None:
            return self.ids.shape[0] * (self.ids.shape[1] - 1)
        return sum(int(m[1:].sum()) for m in self.targets)

    def digest(self) -> str:
        """sha256 of the token ids and masks: a resumed run must see the same data."""
        h = hashlib.sha256()
        for t in ([self.ids] if isinstance(self.ids, torch.Tensor) else self.ids) + (self.targets or []):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class TrainData:
    train: Sequences
    val: Sequences | None
    info: dict = field(default_factory=dict)  # source, format, counts: recorded in the run
    tokenizer: Tokenizer | None = None  # what tokenized it (objectives that need it: distillation)

    def step_batches(self, consumed: int, micro_batch: int, grad_accum: int, world: int = 1, rank: int = 0,
                     seed: int = 0) -> list[Batch]:
        """This process's micro-batches of the optimizer step that starts after `consumed` sequences: the step
        takes the next micro_batch * grad_accum * world sequences of the seeded order, wrapping into the next
        epoch's order; process `rank` takes every world-th micro-batch."""
        per_micro = micro_batch
        indices = sequence_order(len(self.train), seed, consumed, per_micro * grad_accum * world)
        chunks = [indices[i:i + per_micro] for i in range(0, len(indices), per_micro)]
        return [self.train.batch(c) for c in chunks[rank::world]]


def sequence_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Sequences start..start+count of the infinite order: epoch e is a permutation of range(n) seeded by
    (seed, e). Deterministic: the same seed gives the same order on every machine and after a resume."""
    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(n - offset, count - len(out))
        out += perm[offset:offset + take].tolist()
        pos += take
    return out


# ---- loading ---------------------------------------------------------------------------------
def load_data(spec: str, tokenizer: Tokenizer, seq_len: int, fmt: str | None = None, eval_spec: str | None = None,
              val_fraction: float = 0.05) -> TrainData:
    """TrainData from SOURCE in `fmt` (text | alpaca | chat; None: detected from the file), held-out data from
    `eval_spec` or, without it, the last val_fraction of the source."""
    fmt = fmt or detect_format(spec)
    require(fmt in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    make = text_sequences if fmt == "text" else lambda s, t, n: supervised_sequences(s, t, n, fmt)
    train, source = make(spec, tokenizer, seq_len)
    if eval_spec:
        val, _ = make(eval_spec, tokenizer, seq_len)
    else:
        train, val = split_off(train, val_fraction, spec, seq_len)
    info = {"source": source, "format": fmt, "seq_len": seq_len, "train_sequences": len(train),
            "train_target_tokens": train.target_tokens(), "val_source": eval_spec or f"last {val_fraction:g} of source",
            "val_sequences": len(val) if val else 0, "val_target_tokens": val.target_tokens() if val else 0,
            "digest": train.digest()}
    return TrainData(train, val, info, tokenizer)


def detect_format(spec: str) -> str:
    """alpaca for records with `instruction` / `output`, chat for records with `messages`, else text."""
    path = resolve_source(spec)
    if path is None or path.is_dir() or path.suffix not in (".json", ".jsonl"):
        return "text"
    first = _first_record(path)
    if isinstance(first, dict) and "messages" in first:
        return "chat"
    if isinstance(first, dict) and "instruction" in first:
        return "alpaca"
    require(path.suffix == ".jsonl", f"{path}: a .json file must hold Alpaca records (instruction / output)")
    return "text"


def _first_record(path: Path):
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data[0] if isinstance(data, list) and data else data
        with path.open("rb") as f:
            return json.loads(next((line for line in f if line.strip()), b"null"))
    except (ValueError, UnicodeDecodeError):
        return None  # the reader reports the malformed line


def split_off(seqs: Sequences, fraction: float, spec: str, seq_len: int) -> tuple[Sequences, Sequences]:
    """The last `fraction` of the sequences (at least one) held out; the rest train."""
    n = len(seqs)
    require(n >= 2, f"{spec}: too little data: {n} sequence(s) of {seq_len + 1} tokens; need 2 (one held out) "
            "or --eval-data")
    k = min(max(1, round(n * fraction)), n - 1)
    if isinstance(seqs.ids, torch.Tensor):
        return Sequences(seqs.ids[:n - k]), Sequences(seqs.ids[n - k:])
    return (Sequences(seqs.ids[:n - k], seqs.targets[:n - k], seqs.pad_id),
            Sequences(seqs.ids[n - k:], seqs.targets[n - k:], seqs.pad_id))


def text_sequences(spec: str, tokenizer: Tokenizer, seq_len: int) -> tuple[Sequences, str]:
    """All text of SOURCE tokenized once and packed into [N, seq_len + 1] (consecutive sequences share their
    boundary token, so every token but the first is a target exactly once)."""
    text = read_text(spec)
    ids = tokenize_text(text.text, tokenizer)
    n = (len(ids) - 1) // seq_len
    require(n >= 1, f"{spec}: {len(ids)} tokens is shorter than one sequence of {seq_len + 1}; lower --seq-len")
    flat = torch.tensor(ids[:n * seq_len + 1], dtype=torch.long)
    packed = flat.unfold(0, seq_len + 1, seq_len)  # [N, L+1], row i = flat[i L : i L + L + 1]
    return Sequences(packed.contiguous()), text.source


def tokenize_text(text: str, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the whole text, encoded in batches of pieces cut after blank lines (fast, and the same
    ids as encoding it whole wherever a tokenizer keeps paragraphs apart)."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + CHUNK_CHARS)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    ids = [i for enc in tokenizer.backend.encode_batch(pieces, add_special_tokens=False) for i in enc.ids]
    if tokenizer.add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


# ---- supervised ------------------------------------------------------------------------------
def supervised_sequences(spec: str, tokenizer: Tokenizer, seq_len: int, fmt: str) -> tuple[Sequences, str]:
    """Every record rendered and masked (supervised_tokens), cut to seq_len + 1 tokens; records left with
    no assistant token after the cut are dropped (counted in the run's data info)."""
    path = resolve_source(spec)
    require(path is not None and path.is_file(), f"{spec}: no such file (supervised data is a .json / .jsonl file)")
    records = read_records(path)
    ids, targets, end_ids = [], [], tokenizer.stop_ids()
    for number, rec in enumerate(records, 1):
        messages = alpaca_messages(rec, path, number) if fmt == "alpaca" else chat_messages(rec, path, number)
        tokens, mask = supervised_tokens(tokenizer, messages, end_ids)
        tokens, mask = tokens[:seq_len + 1], mask[:seq_len + 1]
        if mask[1:].any():
            ids.append(tokens)
            targets.append(mask)
    require(bool(ids), f"{path}: no record keeps an assistant token within {seq_len + 1} tokens")
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return Sequences(ids, targets, pad), str(path)


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlmError(f"{path}: not valid JSON ({exc})") from None
    require(isinstance(data, list) and all(isinstance(r, dict) for r in data), f"{path}: expected a list of records")
    require(bool(data), f"{path}: no records (empty)")
    return data


def alpaca_messages(rec: dict, path: Path, number: int) -> list[dict]:
    where = f"{path}: record {number}"
    for key in ("instruction", "output"):
        require(isinstance(rec.get(key), str), f"{where}: '{key}' must be a string")
    require(isinstance(rec.get("input", ""), str), f"{where}: 'input' must be a string")
    prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]


def chat_messages(rec: dict, path: Path, number: int) -> list[dict]:
    where = f"{path}: record {number}"
    messages = rec.get("messages")
    require(isinstance(messages, list) and bool(messages), f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        require(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str),
                f"{where}: every message needs string 'role' and 'content'")
    require(any(m["role"] == "assistant" for m in messages), f"{where}: no assistant turn to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def supervised_tokens(tokenizer: Tokenizer, messages: list[dict], end_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N] and target mask [N] of one conversation: True on each assistant reply's tokens up to and
    including the first token that ends the turn (`end_ids`, Tokenizer.stop_ids); False elsewhere."""
    pieces, rendered = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        full = tokenizer.render_chat(messages[:i + 1], add_generation_prompt=False)
        require(prompt.startswith(rendered) and full.startswith(prompt), "the chat template does not render a "
                "conversation as an extension of its prefixes; supervised masks cannot be derived from it")
        pieces += [(prompt[len(rendered):], False), (full[len(prompt):], True)]
        rendered = full
    pieces.append((tokenizer.render_chat(messages, add_generation_prompt=False)[len(rendered):], False))
    ids, mask = [], []
    if tokenizer.add_bos and tokenizer.bos_token_id is not None:
        ids, mask = [tokenizer.bos_token_id], [False]
    for text, trained in pieces:
        piece = tokenizer.encode(text, add_bos=False)
        ids += piece
        mask += _reply_mask(piece, end_ids) if trained else [False] * len(piece)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def _reply_mask(piece: list[int], end_ids: set[int]) -> list[bool]:
    """True up to and including the first end-of-turn token (the rest, e.g. a newline after it, is template)."""
    end = next((i for i, t in enumerate(piece) if t in end_ids), len(piece) - 1)
    return [i <= end for i in range(len(piece))]
