"""Request and response bodies of `/v1/chat/completions` and `/v1/completions`, in OpenAI's shape, and the body
the API sends on to an inference worker."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import InvalidRequest


class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, where: str) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" for part in self.content):
            raise InvalidRequest("Only text content parts are supported", param=f"{where}.content")
        return "".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints share. Unknown fields are ignored, as OpenAI's SDK may send new ones; the known ones
    this server cannot honour are refused by name rather than silently dropped."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("at most 4 non-empty stop strings")
        return value

    def refuse_unsupported(self, max_n: int) -> None:
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported by this server", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequest(f"{name} is not supported by this server (only 0)", param=name)
        if (self.n or 1) > max_n:
            raise InvalidRequest(f"n may be at most {max_n} (TUNEQUEUE_INFERENCE_MAX_N)", param="n")

    def sampling(self, max_tokens: int | None, default_max_tokens: int) -> dict:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "max_tokens": max_tokens or default_max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "stop": stops,
            "seed": self.seed,
            "n": self.n or 1,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionCreate(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Any] | None = None
    response_format: dict | None = None

    def worker_body(self, default_max_tokens: int) -> dict:
        if self.tools:
            raise InvalidRequest("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequest("Only the text response format is supported", param="response_format")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages[{i}]")}
            for i, m in enumerate(self.messages)
        ]
        return {
            "messages": messages,
            **self.sampling(self.max_completion_tokens or self.max_tokens, default_max_tokens),
        }


class CompletionCreate(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def worker_body(self, default_max_tokens: int) -> dict:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise InvalidRequest("Give one prompt per request", param="prompt")
        if self.echo or self.suffix:
            raise InvalidRequest(
                "echo and suffix are not supported by this server", param="echo" if self.echo else "suffix"
            )
        return {"prompt": prompts[0], **self.sampling(self.max_tokens, default_max_tokens)}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    ).model_dump()


def chat_completion(
    id: str, created: int, model: str, texts: dict[int, str], reasons: dict[int, str], used: dict
) -> dict:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts.get(i, ""), "refusal": None},
            "finish_reason": reasons.get(i, "stop"),
            "logprobs": None,
        }
        for i in sorted(reasons)
    ]
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": used, "system_fingerprint": None,
    }  # fmt: skip


def text_completion(
    id: str, created: int, model: str, texts: dict[int, str], reasons: dict[int, str], used: dict
) -> dict:
    choices = [
        {"index": i, "text": texts.get(i, ""), "finish_reason": reasons.get(i, "stop"), "logprobs": None}
        for i in sorted(reasons)
    ]
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": used,
    }


def chat_chunk(id: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }  # fmt: skip


def text_chunk(id: str, created: int, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    return {
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }  # fmt: skip


def usage_chunk(id: str, created: int, model: str, object: str, used: dict) -> dict:
    return {"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": used}
