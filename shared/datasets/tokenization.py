"""Examples → token ids and a loss mask, with the base model's own tokenizer (`tokenizer.json`) and chat
template, using only `tokenizers` and a sandboxed Jinja (no torch): the API's dry run, the worker's validation
report and the recipe all encode through here, so what is reported is what is trained.

Loss falls on assistant turns only (unless `train_on_inputs`), each span running through the turn's
end-of-turn token so the tuned model learns to stop; `weight: 0` turns are skipped. Prompt/completion trains
the completion plus EOS; text trains everything plus EOS."""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from shared.datasets.validation import CHAT, PROMPT_COMPLETION

IGNORE_INDEX = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class EncodingError(ValueError):
    pass


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    full_length: int = 0

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class ChatTokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.folder = folder
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template_file = folder / "chat_template.jinja"
        self.template_source = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        self.template = _compile(self.template_source) if self.template_source else None
        self.eos_id = self._token_id(self.special["eos_token"])
        self.pad_id = self._token_id(self.special["pad_token"]) if self.special["pad_token"] else self.eos_id

    def _token_id(self, text: str | None) -> int | None:
        return self.tokenizer.token_to_id(text) if text else None

    def fingerprint(self) -> str:
        """sha256 of the tokenizer and template: changes when either would change the tokens."""
        digest = hashlib.sha256((self.folder / "tokenizer.json").read_bytes())
        digest.update((self.template_source or "").encode())
        return digest.hexdigest()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.template is None:
            raise EncodingError("the base model has no chat template; use prompt/completion or text data")
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.template.render(messages=clean, add_generation_prompt=add_generation_prompt, **self.special)

    def encode(self, record: dict, kind: str, max_seq_length: int, train_on_inputs: bool = False) -> Encoded:
        if kind == CHAT:
            text, spans = self._chat_spans(record["messages"])
            eos = False
        elif kind == PROMPT_COMPLETION:
            text = record["prompt"] + record["completion"]
            spans = [(len(record["prompt"]), len(text))]
            eos = True
        else:
            text, spans, eos = record["text"], [(0, len(record["text"]))], True
        if train_on_inputs:
            spans = [(0, len(text))]
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(encoding.ids)
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(ids, encoding.offsets, strict=True)
        ]
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
            labels.append(self.eos_id)
        full = len(ids)
        return Encoded(ids[:max_seq_length], labels[:max_seq_length], full > max_seq_length, full)

    def _chat_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        text = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            through = self.render(messages[: index + 1])
            if not text.startswith(through) or not through.startswith(prompt):
                raise EncodingError("the chat template does not render conversations prefix by prefix")
            spans.append((len(prompt), len(through)))
        return text, spans

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile(source: str):
    # The same sandbox and helpers transformers gives chat templates (they are untrusted code).
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
