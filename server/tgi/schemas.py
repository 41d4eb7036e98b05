"""TGI protocol at the HTTP edge: request models (bounds on every field), their mapping to the
library's parameter objects, and the response / stream-event shapes.

Pydantic lives here only; the library gets frozen dataclasses (`SamplingParams`, `SafetyParams`,
`Prompt`). Field names follow huggingface/text-generation-inference (``router/src/lib.rs``).

Request models validate in pydantic's strict mode (our choice): ``"10"`` is not an integer and
``"true"`` not a boolean, as in JSON itself; a float field still takes an integer (``1`` for
``1.0``), as pydantic's strict mode allows.
"""

from __future__ import annotations

import math
import secrets
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints,
                      WithJsonSchema, field_validator)
from pydantic_core import PydanticCustomError

from safety_decoding.decode import TokenOutput
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import Prompt, build_chat_prompt, build_raw_prompt
from safety_decoding.sampling import MAX_STOP_STRINGS, SamplingParams
from safety_decoding.types import Action, Schedule

MAX_STOP_CHARS = 256
MAX_SEED = 2**63  # exclusive; torch.Generator.manual_seed takes a signed 64-bit seed


def valid_unicode(text: str) -> str:
    """Reject lone surrogates: JSON escapes can carry them (``"\\udcff"``) but UTF-8 cannot,
    and the tokenizer would fail on them later (a 500 instead of a 400 naming the field).

    Raises:
        PydanticCustomError: ``invalid_unicode`` with the character offset.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("invalid_unicode",
                                  "contains a lone surrogate at character {offset}; text must "
                                  "be valid Unicode", {"offset": exc.start}) from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
"""A request string that can be encoded as UTF-8."""
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS),
                       AfterValidator(valid_unicode)]
STOP_STRING_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}


def only(*values) -> WithJsonSchema:
    """The JSON schema of a parameter this server accepts only at its neutral ``values`` (the
    field's validator rejects the rest), so the OpenAPI document says what is accepted."""
    return WithJsonSchema({"enum": list(values)})


class SafetyOverrides(BaseModel):
    """Per-request safety settings (our extension); only stricter than the server's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    threshold: float | None = Field(None, gt=0, lt=1,
                                    description="Lower than the server's threshold, in (0, 1).")
    schedule: Literal[Schedule.values()] | None = Field(
        None, description="`each`, `annealing`, `periodic` or `first` (densest first); never "
                          "sparser than the server's.")
    action: Literal[Action.values()] | None = Field(
        None, description="`refuse`, `reweight` or `monitor` (strictest first); never weaker "
                          "than the server's.")


def _unsupported() -> PydanticCustomError:
    return PydanticCustomError("unsupported", "not supported by this server")


class GenerateParameters(BaseModel):
    """TGI ``parameters`` plus our ``response_prefix``, ``raw`` and ``safety``."""

    # The schema says what `TGIRequest.check` enforces: no response_prefix with raw.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "if": {"properties": {"raw": {"const": True}}, "required": ["raw"]},
        "then": {"properties": {"response_prefix": {"maxLength": 0}}}})

    max_new_tokens: int | None = Field(
        None, ge=1,
        description="Tokens to generate at most; unset: as many as fit, up to the server limit "
                    "(ESS_MAX_NEW_TOKENS_LIMIT, checked per app so the error names it).")
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False, description="> 0; != 1 turns sampling on (TGI).")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="(0, 1]; < 1 turns sampling on.")
    top_k: int | None = Field(None, ge=0, description=">= 0; 0 disables; > 0 turns sampling on.")
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False, description="> 0; 1 disables.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="Sampling seed, [0, 2**63).")
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS,
                                   description="Stop strings (never returned), at most 8.")
    details: bool = Field(False, description="Return `details` (tokens, finish reason, seed).")
    ignore_eos: bool = Field(False, description="Ours (vLLM's extension): keep generating past "
                                                "end-of-sequence, up to max_new_tokens (load tests).")
    return_full_text: bool = Field(False, description="Prepend `inputs` to generated_text.")
    response_prefix: Text = Field(
        "", description="Ours: text after the assistant header, treated as response text "
                        "(how prefill attacks are run). Not with `raw`.")
    raw: bool = Field(False, description="Ours: `inputs` is already chat-templated: its turns "
                                         "are the query span, and text after the last "
                                         "assistant header is response text (a prefill); text "
                                         "without template markers is all query.")
    safety: SafetyOverrides | None = None

    # TGI parameters this server does not implement: accepted only at their neutral value, so
    # that clients sending TGI's full parameter set (with nulls) keep working.
    best_of: Annotated[int | None, only(1, None)] = None
    decoder_input_details: Annotated[bool, only(False)] = False
    truncate: Annotated[int | None, only(None)] = None
    typical_p: Annotated[float | None, only(None)] = None
    watermark: Annotated[bool, only(False)] = False
    top_n_tokens: Annotated[int | None, only(0, None)] = None
    grammar: Annotated[Any, only(None)] = None
    adapter_id: Annotated[str | None, only(None)] = None
    frequency_penalty: Annotated[float | None, only(0, None)] = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise PydanticCustomError("unsupported", "only 1 is supported by this server")
        return v

    @field_validator("decoder_input_details", "watermark")
    @classmethod
    def _off(cls, v):
        if v:
            raise _unsupported()
        return v

    @field_validator("truncate", "typical_p", "grammar", "adapter_id")
    @classmethod
    def _unset(cls, v):
        if v is not None:
            raise _unsupported()
        return v

    @field_validator("top_n_tokens", "frequency_penalty")
    @classmethod
    def _zero(cls, v):
        if v not in (None, 0):
            raise _unsupported()
        return v


class GenerateRequest(BaseModel):
    """Body of ``POST /generate``, ``POST /generate_stream`` and ``POST /``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: Text = Field(min_length=1, description="One user message (or a templated prompt "
                                                   "with parameters.raw).")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="`POST /` streams when true (TGI's compat route); "
                                            "the other routes ignore it.")


# ---- request -> library objects ------------------------------------------------------------


def build_prompt(tokenizer, body: GenerateRequest, max_client_bytes: int | None = None) -> Prompt:
    """``inputs`` as one user message through the chat template, or raw.

    Raises:
        PromptError: the template cannot be applied (``field`` names the request field).
        ClientTextTooLong: over ``max_client_bytes`` (`prompt.encode_segments`).
    """
    p = body.parameters
    if p.raw:
        return build_raw_prompt(tokenizer, body.inputs, max_client_bytes)
    return build_chat_prompt(tokenizer, [{"role": "user", "content": body.inputs}],
                             p.response_prefix, max_client_bytes)


def sampling_enabled(p: GenerateParameters) -> bool:
    """TGI's rule: ``do_sample`` or any warper away from its neutral value turns sampling on.

    Source: text-generation-inference ``server/.../utils/tokens.py`` (``has_warpers``).
    """
    return (p.do_sample
            or (p.temperature is not None and p.temperature != 1.0)
            or (p.top_k is not None and p.top_k != 0)
            or (p.top_p is not None and p.top_p < 1.0))


def resolve_seed(p: GenerateParameters, sampling: bool) -> int | None:
    """The seed to report: the client's, or a fresh one when sampling (TGI picks one too, so
    the response says how to reproduce it). None for greedy decoding, as TGI."""
    if not sampling:
        return None
    return p.seed if p.seed is not None else secrets.randbelow(MAX_SEED)


def to_sampling_params(p: GenerateParameters, max_new_tokens: int,
                       seed: int | None) -> SamplingParams:
    """Library sampling parameters. ``seed`` None (greedy) becomes 0: the generator is unused
    then, and an explicit seed keeps the library from reseeding torch's global RNG.

    Raises:
        ParameterError: a value the library rejects.
    """
    sampling = sampling_enabled(p)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=p.top_k if p.top_k is not None else 0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        seed=seed if seed is not None else (p.seed if p.seed is not None else 0),
        stop=tuple(p.stop),
        ignore_eos=p.ignore_eos,
    )


def to_safety_params(server: SafetyParams, overrides: SafetyOverrides | None) -> SafetyParams:
    """The server's policy, made stricter by the request's overrides.

    Raises:
        ParameterError: a threshold above the server's or a sparser schedule.
    """
    if overrides is None:
        return server
    return server.stricter(threshold=overrides.threshold, schedule=overrides.schedule,
                           action=overrides.action)


# ---- responses -----------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    """JSON has no infinities: a -inf log-probability is reported as null."""
    return x if math.isfinite(x) else None


def token_json(t: TokenOutput) -> dict:
    """TGI ``Token``; the text is what this token released (may be "")."""
    return {"id": t.id, "text": t.text, "logprob": _finite(t.logprob), "special": False}


def special_token_json(token_id: int | None) -> dict:
    """The end-of-sequence token TGI streams last; the library does not report its logprob."""
    return {"id": token_id, "text": "", "logprob": None, "special": True}


def generate_response(text: str, tokens: list[TokenOutput], finish_reason: str,
                      generated_tokens: int, seed: int | None, safety: dict | None,
                      details: bool) -> dict:
    """``POST /generate`` body: TGI's shape plus a top-level ``safety`` object."""
    out: dict = {"generated_text": text}
    if details:
        out["details"] = {
            "finish_reason": finish_reason,
            "generated_tokens": generated_tokens,
            "seed": seed,
            "prefill": [],
            "tokens": [token_json(t) for t in tokens],
            "safety": safety,
        }
    out["safety"] = safety
    return out


def stream_event(index: int, token: dict) -> dict:
    """One ``/generate_stream`` event that is not the last."""
    return {"index": index, "token": token, "generated_text": None, "details": None}


def final_stream_event(index: int, token: dict, text: str, finish_reason: str,
                       generated_tokens: int, prompt_tokens: int, seed: int | None,
                       safety: dict | None) -> dict:
    """The last ``/generate_stream`` event: TGI's ``StreamDetails`` plus ``safety``."""
    return {
        "index": index,
        "token": token,
        "generated_text": text,
        "details": {"finish_reason": finish_reason, "generated_tokens": generated_tokens,
                    "seed": seed, "input_length": prompt_tokens, "safety": safety},
        "safety": safety,
    }
