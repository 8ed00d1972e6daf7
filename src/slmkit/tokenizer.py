"""Tokenizer and chat template: a thin layer over Hugging Face `tokenizers` and jinja2.

Built from a Hugging Face folder (tokenizer.json + tokenizer_config.json) or from a GGUF file's metadata
(byte-level BPE vocabularies are converted here; other GGUF tokenizer kinds use transformers' converter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from .errors import SlmError

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    gguf_meta: dict = field(default_factory=dict)  # tokenizer.ggml.* fields kept for GGUF export

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise SlmError("this model has no chat template; run without --chat")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self._text(self.bos_token_id), eos_token=self._text(self.eos_token_id))

    def _text(self, token_id: int | None) -> str:
        return (self.token(token_id) or "") if token_id is not None else ""

    def stop_ids(self) -> set[int]:
        """Tokens that end generation: EOS and the token the chat template closes an assistant turn with."""
        stops = {self.eos_token_id} if self.eos_token_id is not None else set()
        if self.chat_template:
            marker = "\x00slmkit\x00"
            text = self.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                    add_generation_prompt=False)
            after = self.backend.encode(text.split(marker, 1)[-1], add_special_tokens=False).ids
            stops.update(after[:1])
        return stops

    # ---- persistence (Hugging Face layout) ------------------------------------------------------
    def save(self, folder: Path) -> None:
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                  "bos_token": self._text(self.bos_token_id) or None, "eos_token": self._text(self.eos_token_id) or None,
                  "chat_template": self.chat_template, "clean_up_tokenization_spaces": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        if self.gguf_meta:
            (folder / "gguf_tokenizer.json").write_text(json.dumps(self.gguf_meta))

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise SlmError(f"{folder}: no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise SlmError(f"{path}: cannot read tokenizer ({str(exc).splitlines()[0]})") from None
        conf = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        template = conf.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        gguf_meta = _read_json(folder / "gguf_tokenizer.json") if (folder / "gguf_tokenizer.json").is_file() else {}
        return cls(backend, _token_id(backend, conf.get("bos_token")), _token_id(backend, conf.get("eos_token")),
                   bool(conf.get("add_bos_token", False)), template, gguf_meta)

    @classmethod
    def from_gguf(cls, meta: dict, path: Path) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        backend = _bpe_from_gguf(meta) if kind == "gpt2" else _transformers_gguf_tokenizer(path, kind)
        keep = {k: v for k, v in meta.items() if k.startswith("tokenizer.") and k not in (
            "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}
        # Byte-level BPE models (SmolLM2, Qwen2) were trained without BOS; their Hugging Face tokenizers add
        # none, whatever llama.cpp's add_bos_token says, and we follow the Hugging Face reference.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and kind != "gpt2"
        return cls(backend, meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"), add_bos,
                   meta.get("tokenizer.chat_template"), keep)


def vocabulary_difference(a: Tokenizer, a_rows: int, b: Tokenizer, b_rows: int, b_name: str = "the other"
                          ) -> str | None:
    """None when two models share a vocabulary (embedding rows, then token strings and ids); else what differs,
    as a phrase about `a`: "has a vocabulary of 300 tokens, the other 512"."""
    if a_rows != b_rows:
        return f"has a vocabulary of {a_rows} tokens, {b_name} {b_rows}"
    mine, theirs = a.backend.get_vocab(), b.backend.get_vocab()
    if mine != theirs:
        token = next(iter(sorted(set(mine.items()) ^ set(theirs.items()))))
        return f"has {len(mine)} token strings, {b_name} {len(theirs)}, and they differ (e.g. {token[0]!r})"
    return None


def _raise_template_error(message: str):
    raise SlmError(f"chat template: {message}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlmError(f"{path}: not valid JSON ({exc})") from None


def _token_id(backend: HFTokenizer, token) -> int | None:
    if isinstance(token, dict):  # AddedToken serialised as a dict
        token = token.get("content")
    return backend.token_to_id(token) if token else None


def _bpe_from_gguf(meta: dict) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style) tokenizer from GGUF vocabulary, merges and token types."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)]
    backend.add_special_tokens(special)
    return backend


def _transformers_gguf_tokenizer(path: Path, kind) -> HFTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SlmError(f"GGUF tokenizer kind {kind!r} needs transformers (pip install transformers)") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise SlmError(f"{path}: cannot build tokenizer of kind {kind!r} ({exc})") from None
    return tok.backend_tokenizer
