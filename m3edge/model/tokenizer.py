"""Tokenizer and chat template of a checkpoint directory (`tokenizers` + a sandboxed jinja2).

Also builds the byte-level BPE tokenizer that synthetic checkpoints ship, with special tokens at
the exact ids the config names (Qwen's ids for full-size presets).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from m3edge.errors import CheckpointError

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'audio' -%}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""Qwen ChatML with the image and audio placeholders of spec section 3 (a span is expanded later)."""


def _raise(msg: str) -> None:
    raise TemplateError(msg)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None, bos: str | None = None,
                 eos: str | None = None, add_bos: bool = False):
        self.tok = tok
        self.bos_token, self.eos_token, self.add_bos = bos, eos, add_bos
        self.bos_id = tok.token_to_id(bos) if bos else None
        self.chat_template = chat_template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f))
        self._template = env.from_string(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        d = Path(model_dir)
        try:
            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"cannot load {d / 'tokenizer.json'}: {e}") from None
        cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
        tpl_path = d / "chat_template.jinja"
        tpl = tpl_path.read_text() if tpl_path.exists() else cfg.get("chat_template")
        return cls(tok, tpl, cfg.get("bos_token"), cfg.get("eos_token"), bool(cfg.get("add_bos_token", False)))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Special tokens written in `text` (e.g. `<|im_start|>`) are parsed as special ids."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise CheckpointError("this checkpoint has no chat template (chat_template.jinja)")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def build_bpe_tokenizer(corpus: list[str], specials: dict[int, str], max_vocab: int) -> HFTokenizer:
    """Byte-level BPE trained on `corpus` (so any text round-trips), specials at exactly their ids.

    `tokenizers` numbers added tokens consecutively after the model vocabulary, so every id from
    the end of the trained vocabulary to the last special that is not a special itself becomes a
    special `<|reserved_N|>` (never produced by encoding, skipped by decoding).
    """
    first = min(specials)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(max_vocab, first), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    d = json.loads(tok.to_str())
    d["added_tokens"] = [
        {"id": i, "content": specials.get(i, f"<|reserved_{i}|>"), "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i in range(len(d["model"]["vocab"]), max(specials) + 1)
    ]
    out = HFTokenizer.from_str(json.dumps(d))
    for i, s in specials.items():
        assert out.token_to_id(s) == i, f"special token {s} landed at {out.token_to_id(s)}, not {i}"
    return out
