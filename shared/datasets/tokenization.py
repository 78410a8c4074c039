"""Examples → token ids and a loss mask, with the base model's own tokenizer (`tokenizer.json`) and chat
template, using only `tokenizers` and a sandboxed Jinja (no torch): the API's dry run, the worker's validation
report and the recipe all encode through here, so what is reported is what is trained.

Loss falls on assistant turns only (unless `train_on_inputs`), each span running through the turn's
end-of-turn token so the tuned model learns to stop; `weight: 0` turns are skipped. Prompt/completion trains
the completion plus EOS; text trains everything plus EOS.

A chat example is rendered once, whatever its length (`_chat_spans`): rendering every prefix again for every
assistant turn costs the square of the conversation's length, which a single long line turns into minutes."""

import bisect
import hashlib
import json
import re
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
        self.leading = self._leading_special_tokens(config.get("add_bos_token"))

    def _token_id(self, text: str | None) -> int | None:
        return self.tokenizer.token_to_id(text) if text else None

    def _leading_special_tokens(self, add_bos_token) -> list[int]:
        """What the tokenizer puts before a text of its own accord: the special tokens its post-processor adds
        in front (a Llama tokenizer's BOS; nothing for SmolLM2's), unless `tokenizer_config.json` says
        `add_bos_token` explicitly, which transformers follows. A chat template writes its own BOS where the
        model wants one, so only prompt/completion and text examples get these."""
        probe = self.tokenizer.encode("a", add_special_tokens=True)
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        start = next((k for k in range(len(probe.ids)) if probe.ids[k : k + len(plain)] == plain), 0)
        leading = list(probe.ids[:start]) if all(probe.special_tokens_mask[:start]) else []
        bos_id = self._token_id(self.special["bos_token"])
        if add_bos_token is True and bos_id is not None and bos_id not in leading:
            leading.insert(0, bos_id)
        if add_bos_token is False:
            leading = [token for token in leading if token != bos_id]
        return leading

    def prompt_ids(self, text: str, kind: str) -> list[int]:
        """A prompt as the model saw prompts in training: a chat render as it is, a plain prompt after the
        tokenizer's leading special tokens (`leading`)."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return ids if kind == CHAT else self.leading + ids

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
        ids, offsets = self._encode_in_pieces(text, [start for start, _ in spans])
        labels = _labels(ids, offsets, spans)
        if kind != CHAT and self.leading:
            ids, labels = self.leading + ids, [IGNORE_INDEX] * len(self.leading) + labels
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
            labels.append(self.eos_id)
        full = len(ids)
        return Encoded(ids[:max_seq_length], labels[:max_seq_length], full > max_seq_length, full)

    def _encode_in_pieces(self, text: str, cuts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """`text`'s tokens and their offsets, encoded piece by piece between the `cuts` (where trained spans
        begin). At generation the prompt is encoded alone and the answer's tokens follow it, so training does the
        same: encoded whole, an answer that begins with a space (" Hello", a completion after "A: ") could have
        that space merged into the prompt's last token, which is masked, and the model would never learn to write
        it. Where nothing straddles a cut the tokens are the same either way."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        bounds = [0, *sorted({cut for cut in cuts if 0 < cut < len(text)}), len(text)]
        for start, end in zip(bounds, bounds[1:], strict=False):
            encoding = self.tokenizer.encode(text[start:end], add_special_tokens=False)
            ids.extend(encoding.ids)
            offsets.extend((begin + start, finish + start) for begin, finish in encoding.offsets)
        return ids, offsets

    def _chat_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and each trained assistant turn's span in it: from where the generation
        prompt ends (`render(turns before, add_generation_prompt=True)`) through the turn's end (`render(turns
        through it)`). Found in one render where the template allows (`_spans_in_one_render`); otherwise prefix by
        prefix, which TUNEQUEUE_MAX_MESSAGES_PER_EXAMPLE bounds."""
        text = self.render(messages)
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        if not trained:
            return text, []
        spans = self._spans_in_one_render(messages, text, trained)
        if spans is None:
            spans = [self._span_by_prefixes(messages, text, index) for index in trained]
        return text, spans

    def _span_by_prefixes(self, messages: list[dict], text: str, index: int) -> tuple[int, int]:
        prompt = self.render(messages[:index], add_generation_prompt=True)
        through = self.render(messages[: index + 1])
        if not text.startswith(through) or not through.startswith(prompt):
            raise EncodingError("the chat template does not render conversations prefix by prefix")
        return len(prompt), len(through)

    def _spans_in_one_render(self, messages: list[dict], text: str, trained: list[int]) -> list[tuple[int, int]] | None:
        """Each message's content is located in the one render through a render with numbered markers in
        place of the contents. The first trained turn, rendered by prefixes (short: it is near the start),
        gives what the template writes between the generation prompt and the content (`lead`) and after the
        content up to the turn's end (`tail`); every trained turn must show the same, and the last one is
        rendered by prefixes as a check. None when the template transforms contents or varies between turns."""
        places = self._content_places(messages, text)
        if places is None:
            return None
        first, last = trained[0], trained[-1]
        prompt_end, turn_end = self._span_by_prefixes(messages, text, first)
        content_start, content_end = places[first]
        if not prompt_end <= content_start <= content_end <= turn_end:
            return None
        lead, tail = text[prompt_end:content_start], text[content_end:turn_end]
        spans = []
        for index in trained:
            start, end = places[index]
            if text[start - len(lead) : start] != lead or text[end : end + len(tail)] != tail:
                return None
            spans.append((start - len(lead), end + len(tail)))
        if last != first and spans[-1] != self._span_by_prefixes(messages, text, last):
            return None
        return spans

    def _content_places(self, messages: list[dict], text: str) -> list[tuple[int, int]] | None:
        """Where each message's content lies in `text`, or None if the template does not write contents
        verbatim and in order."""
        fence = _unused_character([m["content"] for m in messages])
        if fence is None:
            return None
        marked = [{"role": m["role"], "content": f"{fence}{i}{fence}"} for i, m in enumerate(messages)]
        skeleton = self.render(marked)
        pattern = re.compile(f"{re.escape(fence)}(\\d+){re.escape(fence)}")
        found = list(pattern.finditer(skeleton))
        if [int(match.group(1)) for match in found] != list(range(len(messages))):
            return None
        places, pieces, at, shift = [], [], 0, 0
        for match, message in zip(found, messages, strict=True):
            pieces.append(skeleton[at : match.start()])
            start = match.start() + shift
            content = message["content"]
            places.append((start, start + len(content)))
            pieces.append(content)
            shift += len(content) - (match.end() - match.start())
            at = match.end()
        pieces.append(skeleton[at:])
        return places if "".join(pieces) == text else None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token keeps its id as label where it begins inside a span, else IGNORE_INDEX. Spans are sorted
    and disjoint (turns in order), so one bisection per token finds its span: linear in tokens, not
    tokens × turns."""
    starts = [start for start, _ in spans]
    labels = []
    for token, (begin, _) in zip(ids, offsets, strict=True):
        index = bisect.bisect_right(starts, begin) - 1
        labels.append(token if index >= 0 and begin < spans[index][1] else IGNORE_INDEX)
    return labels


def _unused_character(texts: list[str]) -> str | None:
    """A private-use character that none of `texts` holds, to mark places in a render."""
    used = set().union(*map(set, texts))
    return next((chr(code) for code in range(0xE000, 0xF900) if chr(code) not in used), None)


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
