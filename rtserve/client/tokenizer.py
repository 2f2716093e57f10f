"""Tokenizer and chat template, built on the `tokenizers` library (no transformers at run time).

From a GGUF file we rebuild the tokenizer Hugging Face's GGUF conversion produces (byte-level BPE or
SentencePiece, rtserve/client/gguf_tokenizer.py), and cache it as `<key>.tokenizer.json` +
`<key>.tokenizer_config.json` beside the weights cache. From an HF directory
we read `tokenizer.json` and `tokenizer_config.json` (and `chat_template.jinja` if present).
Chat templates render in a jinja2 `ImmutableSandboxedEnvironment` set up as transformers sets it up.
Encode/decode are safe to call from any one thread at a time (the Rust backend is thread-safe).
"""
from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from rtserve.client.chat_encoding import encode_chat
from rtserve.client.gguf_tokenizer import build_backend_from_gguf
from rtserve.model.gguf import GGUFFile, cache_key, default_cache_dir, end_of_turn_token_ids


class Tokenizer:
    """Encode/decode plus chat template. Build with `Tokenizer.load(path)`."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None,
                 eos_token_ids: tuple[int, ...], chat_template: str | None,
                 template_tokens: dict[str, str]) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.eos_token_id: int | None = eos_token_ids[0] if eos_token_ids else None
        added = backend.get_added_tokens_decoder()
        specials = {i for i, tok in added.items() if tok.special}
        self.special_token_ids: frozenset[int] = frozenset(
            specials | set(eos_token_ids) | ({bos_token_id} if bos_token_id is not None else set()))
        self.special_token_texts: tuple[str, ...] = tuple(
            t for t in (backend.id_to_token(i) for i in sorted(self.special_token_ids)) if t)
        self._text_backend: Backend | None = None  # a copy that reads special-token text as text
        self.chat_template = chat_template
        self._template_tokens = dict(template_tokens)  # bos_token, eos_token, ... for the template
        self._compiled = None

    @classmethod
    def load(cls, path: str = "", cache_dir: str = "") -> "Tokenizer":
        """From a GGUF file (cached conversion) or an HF directory; "" is the default model."""
        if not path:
            from rtserve.model.loader import default_model_path
            path = default_model_path()
        if os.path.isdir(path):
            return _load_hf_dir(path)
        return _load_gguf_cached(path, cache_dir)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; special tokens written in `text` (e.g. `<|im_start|>`) map to their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_as_text(self, text: str) -> list[int]:
        """Token ids reading special-token text as plain text (`<|im_end|>` -> `<`, `|`, `im`, ...)."""
        if self._text_backend is None:  # a copy: the shared backend's setting must not flip under a caller
            backend = Backend.from_str(self.backend.to_str())
            backend.encode_special_tokens = True
            self._text_backend = backend
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]:
        """The conversation's prompt ids; message text never becomes a control token (chat_encoding.py)."""
        return encode_chat(self, messages, add_generation_prompt, **template_kwargs)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Renders exactly what the model's template renders (ValueError on template errors)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{**self._template_tokens, **template_kwargs})
        except TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


def _compile_template(source: str):
    """jinja2 sandbox configured like transformers' chat templates."""
    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# --- GGUF -------------------------------------------------------------------------------------

def _gguf_settings(metadata: dict) -> dict[str, Any]:
    """Everything besides the backend, as JSON-able kwargs for `Tokenizer`."""
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if type(i) is int and 0 <= i < len(tokens) else None

    bos = metadata.get("tokenizer.ggml.bos_token_id")
    names = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    template_tokens = {name: token(key) for name, key in names.items() if token(key) is not None}
    chat_template = metadata.get("tokenizer.chat_template")
    return {"bos_token_id": bos if type(bos) is int else None,
            "eos_token_ids": list(end_of_turn_token_ids(metadata)),
            "chat_template": chat_template if isinstance(chat_template, str) else None,
            "template_tokens": template_tokens}


def _load_gguf_cached(path: str, cache_dir: str) -> Tokenizer:
    base = os.path.join(default_cache_dir(cache_dir), cache_key(path))
    try:
        backend = Backend.from_file(base + ".tokenizer.json")
        with open(base + ".tokenizer_config.json", encoding="utf-8") as f:
            settings = json.load(f)
        settings["eos_token_ids"] = tuple(settings["eos_token_ids"])
        return Tokenizer(backend, **settings)
    except Exception:  # absent, torn or stale: rebuild from the GGUF
        pass
    metadata = GGUFFile(path).metadata
    backend, settings = build_backend_from_gguf(metadata), _gguf_settings(metadata)
    try:
        _atomic_write(base + ".tokenizer.json", backend.to_str())
        _atomic_write(base + ".tokenizer_config.json", json.dumps(settings))
    except OSError:
        pass  # a read-only cache only costs start-up time
    settings["eos_token_ids"] = tuple(settings["eos_token_ids"])
    return Tokenizer(backend, **settings)


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- Hugging Face directory ---------------------------------------------------------------------

def _load_hf_dir(path: str) -> Tokenizer:
    backend = Backend.from_file(os.path.join(path, "tokenizer.json"))
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    template_tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            template_tokens[key] = value
    bos = backend.token_to_id(template_tokens["bos_token"]) if "bos_token" in template_tokens else None
    eos_ids = [backend.token_to_id(template_tokens["eos_token"])] if "eos_token" in template_tokens else []
    gen_eos = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
    for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if type(i) is int and i not in eos_ids:
            eos_ids.append(i)
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=tuple(i for i in eos_ids if i is not None),
                     chat_template=template if isinstance(template, str) else None,
                     template_tokens=template_tokens)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    return value if isinstance(value, dict) else {}
