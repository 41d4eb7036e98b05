"""OpenAI protocol at the HTTP edge: request models for ``/v1/chat/completions`` and
``/v1/completions``, their mapping to library objects, and the response / chunk shapes.

Field names and shapes follow the OpenAI API reference (Chat Completions, Completions,
Models); where OpenAI is silent or a server must choose, we follow vLLM's OpenAI-compatible
server (``vllm/entrypoints/openai/protocol.py``), and say so. Unknown fields are ignored, as
vLLM does (OpenAI itself rejects them): clients send many optional fields (``user``, ``store``,
``metadata``...) that do not change the tokens. Fields that *would* change the tokens but are
not implemented (``logprobs``, ``n`` > 1, penalties, tools, ``logit_bias``...) are accepted
only at their neutral value and otherwise answered with a 400 naming the field.

Request models validate in pydantic's strict mode, as the TGI ones (`server.tgi.schemas`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from safety_decoding.decode import StepEvent
from safety_decoding.prompt import Prompt, build_chat_prompt, build_raw_prompt
from safety_decoding.sampling import MAX_STOP_STRINGS, SamplingParams
from safety_decoding.types import FinishReason

from server.engine import reported_finish_reason
from server.tgi.schemas import (MAX_SEED, STOP_STRING_SCHEMA, SafetyOverrides, StopString, Text,
                                only)


def _unsupported(what: str = "not supported by this server") -> PydanticCustomError:
    return PydanticCustomError("unsupported", what)


COMPLETIONS_MAX_TOKENS = 16
"""``max_tokens`` of ``/v1/completions`` when unset or null: OpenAI's documented default (vLLM's when
unset); chat has none (as many as fit)."""

# JSON schemas of the fields whose before-validators take more than their Python type says,
# or that are accepted only empty, so that the OpenAPI document says what is accepted.
_NULL = {"type": "null"}
_TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"},
                                               "text": {"type": "string"}},
              "required": ["type", "text"]}
CONTENT_SCHEMA = WithJsonSchema({"anyOf": [{"type": "string"},
                                           {"type": "array", "items": _TEXT_PART}, _NULL]})
STOP_SCHEMA = WithJsonSchema({"anyOf": [
    STOP_STRING_SCHEMA,
    {"type": "array", "items": STOP_STRING_SCHEMA, "maxItems": MAX_STOP_STRINGS}, _NULL]})
PROMPT_SCHEMA = WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
     "maxItems": 1}]})
EMPTY_LIST = WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0}, _NULL]})
EMPTY_OBJECT = WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": 0}, _NULL]})
TEXT_FORMAT = WithJsonSchema({"anyOf": [
    {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
     "additionalProperties": False}, _NULL]})


# ---- requests ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """``stream_options``; only ``include_usage`` is read."""

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = Field(
        None, description="True: one more chunk before [DONE] with `usage` and empty `choices`, "
                          "and `usage: null` on every other chunk (OpenAI).")


class ChatMessage(BaseModel):
    """One entry of ``messages``. ``content`` is a string or a list of text parts; the parts
    are joined with "\\n" (vLLM's rule). ``developer`` is OpenAI's newer name for ``system``
    and is rendered as ``system`` (chat templates know only that one)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, CONTENT_SCHEMA]  # required, as in OpenAI; null is accepted as ""
    name: str | None = None
    tool_calls: Annotated[list[Any] | None, EMPTY_LIST] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        if v is None:
            return ""
        if not isinstance(v, list):
            return v
        texts = []
        for j, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PydanticCustomError("unsupported", "part {j} has type {kind}; only text "
                                          "parts are supported", {"j": j, "kind": repr(kind)})
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("string_type", "part {j} needs a string `text`",
                                          {"j": j})
            texts.append(part["text"])
        return "\n".join(texts)

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, v):
        if v:
            raise _unsupported("tool calls are not supported by this server")
        return v


class _OpenAIRequest(BaseModel):
    """Fields both routes share. ``safety``, ``top_k`` and ``repetition_penalty`` are
    extensions (``safety`` ours, the other two vLLM's)."""

    # The schema says what `OpenAIRequest.check` enforces: stream_options only with stream.
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={
        "if": {"properties": {"stream_options": {"type": "object"}},
               "required": ["stream_options"]},
        "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]}})

    model: str | None = Field(
        None, description="Accepted and ignored: this server serves one model and reports its "
                          "name (TGI's rule; huggingface_hub sends 'dummy' to a server URL).")
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most; unset: as many as fit, up to the "
                                "server's limit (ESS_MAX_NEW_TOKENS_LIMIT).")
    temperature: float | None = Field(
        None, ge=0, le=2, allow_inf_nan=False,
        description="[0, 2], default 1 (OpenAI); 0 is greedy decoding (vLLM).")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="(0, 1].")
    n: Annotated[int | None, only(1, None)] = Field(
        None, ge=1, description="Only 1 (one choice per request).")
    stream: bool | None = Field(False, description="Server-sent events, ending `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    stop: Annotated[list[StopString] | None, STOP_SCHEMA] = Field(
        None, max_length=MAX_STOP_STRINGS,
        description="A string or up to 8 strings; the text ends before the first match, which "
                    "is never returned.")
    seed: int | None = Field(None, ge=0, lt=MAX_SEED,
                             description="Sampling seed, [0, 2**63): same seed, same text.")
    presence_penalty: Annotated[float | None, only(0, None)] = Field(
        None, ge=-2, le=2, allow_inf_nan=False, description="Only 0 (not implemented).")
    frequency_penalty: Annotated[float | None, only(0, None)] = Field(
        None, ge=-2, le=2, allow_inf_nan=False, description="Only 0 (not implemented).")
    logit_bias: Annotated[dict[str, float] | None, EMPTY_OBJECT] = Field(
        None, description="Only empty.")
    user: str | None = None
    top_k: int | None = Field(None, ge=-1, description="vLLM: -1 or 0 disable top-k.")
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False,
                                             description="vLLM: > 0; 1 disables.")
    ignore_eos: bool = Field(False, description="vLLM: keep generating past end-of-sequence "
                                                "up to max_tokens (load tests).")
    safety: SafetyOverrides | None = Field(
        None, description="Ours: per-request safety policy, only stricter than the server's "
                          "(same object as /generate's parameters.safety).")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v not in (None, 1):
            raise _unsupported("only n=1 is supported by this server")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v not in (None, 0):
            raise _unsupported("not supported by this server (only 0); repetition_penalty "
                               "(vLLM's extension) is")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise _unsupported()
        return v

    def max_tokens_field(self) -> tuple[str, int | None]:
        """``(name, value)`` of the field that bounds the completion (named in errors)."""
        return "max_tokens", self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``{}`` and false: no)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_OpenAIRequest):
    """Body of ``POST /v1/chat/completions``.

    A final ``assistant`` message is a prefill: its text continues as the response (and is
    response text for the safety re-checks, never query); the reply holds only what follows
    it. Our choice, as Anthropic's Messages API and vLLM's ``continue_final_message``.
    """

    messages: list[ChatMessage] = Field(
        min_length=1, description="At least one user message (`build_chat_prompt`).",
        json_schema_extra={"contains": {"type": "object", "properties": {"role": {"const": "user"}},
                                        "required": ["role"]}})
    max_completion_tokens: int | None = Field(
        None, ge=1, description="OpenAI's newer name for max_tokens; wins when both are set "
                                "(vLLM's rule).")
    logprobs: Annotated[bool | None, only(False, None)] = Field(
        None, description="Only false (not implemented).")
    top_logprobs: Annotated[int | None, only(0, None)] = Field(
        None, description="Only 0 (not implemented).")
    response_format: Annotated[dict[str, Any] | None, TEXT_FORMAT] = Field(
        None, description='Only {"type": "text"}.')
    tools: Annotated[list[Any] | None, EMPTY_LIST] = Field(None, description="Only empty.")
    tool_choice: Annotated[str | dict[str, Any] | None, only("none", "auto", None)] = Field(
        None, description='Only "none" or "auto".')

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise _unsupported()
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v):
        if v not in (None, 0):
            raise _unsupported()
        return v

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v):
        if v is not None and v != {"type": "text"}:
            raise _unsupported('only {"type": "text"} is supported by this server')
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise _unsupported("tools are not supported by this server")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v not in (None, "none", "auto"):
            raise _unsupported('only "none" or "auto" (without tools)')
        return v

    def max_tokens_field(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(_OpenAIRequest):
    """Body of ``POST /v1/completions``: one raw prompt (no chat template, as OpenAI and vLLM).

    The prompt is what TGI's ``raw`` mode gets: all query, except that text holding the
    model's own chat-template turns is split as a chat would be (`build_raw_prompt`).
    """

    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most; unset or null: 16, as OpenAI, or fewer "
                                "where fewer fit.")
    # Not empty: an empty prompt has no token to start from (`build_raw_prompt`).
    prompt: Annotated[Text, PROMPT_SCHEMA] = Field(
        min_length=1, description="One string (a list of exactly one is accepted).")
    logprobs: Annotated[int | None, only(None)] = Field(
        None, description="Only null (not implemented).")
    echo: Annotated[bool | None, only(False, None)] = Field(
        False, description="Only false (not implemented).")
    suffix: Annotated[str | None, only(None)] = Field(
        None, description="Only null (not implemented).")
    best_of: Annotated[int | None, only(1, None)] = Field(None, description="Only 1.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        if not isinstance(v, list):
            return v
        if v and all(isinstance(x, (int, list)) for x in v):
            raise _unsupported("token-id prompts are not supported by this server; send text")
        if len(v) != 1:
            raise PydanticCustomError("unsupported", "one prompt per request: got a list of "
                                      "{count}; send one string", {"count": len(v)})
        return v[0]

    @field_validator("logprobs", "suffix")
    @classmethod
    def _unset(cls, v):
        if v is not None:
            raise _unsupported()
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise _unsupported()
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise _unsupported("only 1 is supported by this server")
        return v


# ---- request -> library objects ------------------------------------------------------------


def split_prefill(messages: list[ChatMessage]) -> tuple[list[dict], str]:
    """``(template turns, response prefix)``: a final assistant message is the prefix.

    Turns are ``{"role", "content"}`` dicts for the chat template, ``developer`` as ``system``.
    """
    prefix = ""
    if messages and messages[-1].role == "assistant":
        prefix, messages = messages[-1].content, messages[:-1]
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
             for m in messages]
    return turns, prefix


def build_chat(tokenizer, body: ChatCompletionRequest, max_client_bytes: int | None = None) -> Prompt:
    """The chat prompt: every user turn is query, the prefill (if any) response text.

    Raises:
        PromptError: no user message, or a template that does not copy user text verbatim.
        ClientTextTooLong: over ``max_client_bytes`` (`prompt.encode_segments`).
    """
    turns, prefix = split_prefill(body.messages)
    return build_chat_prompt(tokenizer, turns, prefix, max_client_bytes)


def build_completion(tokenizer, body: CompletionRequest, max_client_bytes: int | None = None) -> Prompt:
    """The raw prompt of a completion request.

    Raises:
        PromptError: the prompt is empty.
        ClientTextTooLong: over ``max_client_bytes`` (`prompt.encode_segments`).
    """
    return build_raw_prompt(tokenizer, body.prompt, max_client_bytes)


def to_sampling_params(body: _OpenAIRequest, max_new_tokens: int) -> SamplingParams:
    """Library sampling parameters. OpenAI samples by default (temperature 1); temperature 0
    is greedy (vLLM). Without a seed the library draws a fresh one per request.

    Raises:
        ParameterError: a value the library rejects (`OpenAIRequest.sampling_field` names it
            for the client).
    """
    temperature = 1.0 if body.temperature is None else body.temperature
    greedy = temperature == 0
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        ignore_eos=body.ignore_eos,
    )


# ---- responses -----------------------------------------------------------------------------

_FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop",
                   FinishReason.LENGTH: "length", FinishReason.CONTENT_FILTER: "content_filter"}


def openai_finish_reason(event: StepEvent) -> str:
    """OpenAI's ``finish_reason`` for a finished event: eos_token / stop_sequence -> "stop",
    length -> "length", a safety intervention -> "content_filter" (OpenAI's own word).

    Raises:
        ValueError: ``event`` is not finished, or was aborted (no OpenAI word: an error).
    """
    reason = reported_finish_reason(event)
    if reason not in _FINISH_REASONS:
        raise ValueError(f"no OpenAI finish_reason for {reason!r}")
    return _FINISH_REASONS[reason]


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI ``usage`` (tokens). The prompt counts the prefill; ``[CLS]`` is not counted."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_completion_id(chat: bool) -> str:
    """``chatcmpl-...`` / ``cmpl-...`` as OpenAI's ids look."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Completion:
    """Shapes the responses and stream chunks of one request (chat or text completion)."""

    id: str
    created: int
    """Unix time (seconds)."""
    model: str
    chat: bool
    include_usage: bool = False

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _choice(self, text: str | None, finish_reason: str | None) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def _chunk(self, choices: list[dict]) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created,
               "model": self.model, "choices": choices}
        if self.include_usage:  # OpenAI: every other chunk says usage: null
            out["usage"] = None
        return out

    def first_chunk(self) -> dict | None:
        """Chat's opening chunk, ``delta: {"role": "assistant", "content": ""}`` (OpenAI);
        None for text completions, which have no role."""
        if not self.chat:
            return None
        choice = self._choice(None, None)
        choice["delta"] = {"role": "assistant", "content": ""}
        return self._chunk([choice])

    def text_chunk(self, text: str) -> dict:
        """A chunk adding ``text`` (never empty: empty releases are not sent)."""
        return self._chunk([self._choice(text, None)])

    def final_chunk(self, finish_reason: str, safety: dict | None) -> dict:
        """The last choice chunk: empty delta (or text), the finish reason, and ``safety``."""
        out = self._chunk([self._choice(None, finish_reason)])
        out["safety"] = safety
        return out

    def usage_chunk(self, usage: dict) -> dict:
        """The ``include_usage`` chunk: empty ``choices`` and the usage (OpenAI)."""
        out = self._chunk([])
        out["usage"] = usage
        return out

    def response(self, text: str, finish_reason: str, usage: dict, safety: dict | None) -> dict:
        """The whole non-streamed response, ``safety`` at the top level (ours)."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage, "safety": safety}


def model_card(name: str, created: int, context: int) -> dict:
    """One ``/v1/models`` entry (OpenAI's Model object plus vLLM's ``max_model_len``)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "ess-serve",
            "max_model_len": context}
