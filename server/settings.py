"""Server configuration (pydantic-settings): environment variables ``ESS_*``, then CLI flags.

Every field below is read from the environment variable named in its description
(``ESS_`` + the upper-case field name). ``ess serve`` flags override the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from uvicorn.config import LOG_LEVELS

from safety_decoding.device import DEVICE_PATTERN, DTYPE_NAMES
from safety_decoding.types import Action, Quantization, Schedule

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "smollm2-135m-ess"


class Settings(BaseSettings):
    """How ``ess serve`` runs. Safety fields left unset take the checkpoint's values."""

    model_config = SettingsConfigDict(env_prefix="ESS_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="ESS_HOST: address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="ESS_PORT: TCP port to bind.")
    checkpoint: Path = Field(DEFAULT_CHECKPOINT,
                             description="ESS_CHECKPOINT: ESS checkpoint folder (ess_config.json, "
                                         "safety head, LoRA adapter).")
    base_model_dir: Path | None = Field(
        None, description="ESS_BASE_MODEL_DIR: prepared base-model folder; unset: the cache folder "
                          "`ess prepare` fills (safety_decoding.base_model.base_model_dir()).")
    model_name: str = Field("smollm2-135m-ess",
                            description="ESS_MODEL_NAME: model name reported in responses.")
    device: str = Field(
        "auto", pattern=DEVICE_PATTERN,
        description="ESS_DEVICE: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal[DTYPE_NAMES] = Field(
        "auto", description="ESS_DTYPE: weights and activations; `auto` is bfloat16 on CUDA and on "
                            "CPUs with AMX or AVX512-BF16 (native bf16 matmuls), float32 elsewhere.")
    fused_forward: bool = Field(
        True, description="ESS_FUSED_FORWARD: run the model through our fused forward (fused "
                          "projections, weights prepacked for oneDNN on CPU; the same function); "
                          "false: transformers' modules (the fallback).")
    compile: bool = Field(
        True, description="ESS_COMPILE: run decode steps of a single running request through a forward "
                          "compiled by torch.compile (inductor, weights frozen; its GEMM templates with AMX "
                          "or in float32: about 1.6x faster per token on 2 AMX cores, 1.06x on 2 "
                          "AVX512-BF16 cores without AMX) where it can run: CPU, the fused "
                          "forward, ESS_QUANTIZATION=none. Compiling adds about 110 s to startup on 2 "
                          "cores (the warm-up). false: every step runs the eager fused forward.")
    quantization: Literal[Quantization.values()] = Field(
        Quantization.NONE.value, description="ESS_QUANTIZATION: `none`, or `int8`: the fused forward's projections "
                            "with int8 weights and dynamically quantized activations (fbgemm; CPU "
                            "and ESS_DTYPE float32 only; the MLP down projection stays float32); faster "
                            "decoding, but it changes 4-6 % of the head's verdicts: see docs/operations.md.")
    first_check_candidates: int | None = Field(
        None, ge=0, le=64, description="ESS_FIRST_CHECK_CANDIDATES: candidate first tokens whose re-check "
                                       "runs inside the prefill, so a first token that is one of them "
                                       "leaves with the prefill instead of after the first decode step "
                                       "(time to first token); 0: off; unset: 16 where the model runs in "
                                       "bfloat16 or float16, 0 in float32, where the extra prefill rows "
                                       "cost more than the step they save. See safety_decoding/first_check.py.")

    safety_enabled: bool = Field(
        True, description="ESS_SAFETY_ENABLED: false serves the model without `[CLS]` and without "
                          "re-checks (a baseline for measurements; never in production).")
    safety_threshold: float | None = Field(
        None, gt=0, lt=1, description="ESS_SAFETY_THRESHOLD: malicious when p > threshold; "
                                      "unset: the checkpoint's. Clients may only lower it.")
    safety_tau: int | None = Field(
        None, ge=1, le=64, description="ESS_SAFETY_TAU: consecutive malicious re-checks that trip "
                                       "a refusal; unset: the checkpoint's.")
    safety_r1: int | None = Field(
        None, ge=1, le=512, description="ESS_SAFETY_R1: rule-1 window (tokens); unset: the "
                                        "checkpoint's.")
    safety_r2: int | None = Field(
        None, ge=1, le=512, description="ESS_SAFETY_R2: rule-2 window (tokens); unset: the "
                                        "checkpoint's.")
    safety_r3: int | None = Field(
        None, ge=1, le=512, description="ESS_SAFETY_R3: rule-3 look-ahead after a transition "
                                        "(tokens); unset: the checkpoint's.")
    safety_schedule: Literal[Schedule.values()] = Field(
        Schedule.EACH.value, description="ESS_SAFETY_SCHEDULE: `each` re-checks every step, `annealing` dense "
                            "early then sparser, `periodic` every ESS_SAFETY_PERIOD tokens, `first` "
                            "only the query. Clients may only make it denser.")
    safety_period: int = Field(
        10, ge=1, le=4096, description="ESS_SAFETY_PERIOD: tokens between re-checks of the "
                                       "`periodic` schedule.")
    safety_action: Literal[Action.values()] = Field(
        Action.REFUSE.value, description="ESS_SAFETY_ACTION: `refuse` inserts the refusal, `reweight` biases "
                              "the logits toward it, `monitor` only "
                              "reports.")

    max_new_tokens_limit: int = Field(
        1024, ge=1, le=4096, description="ESS_MAX_NEW_TOKENS_LIMIT: largest max_new_tokens a "
                                         "request may ask for (tokens).")
    max_input_tokens: int = Field(
        4096, ge=1, description="ESS_MAX_INPUT_TOKENS: longest prompt after templating (tokens).")
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1, description="ESS_MAX_BODY_BYTES: largest request body (bytes); "
                                           "larger ones get HTTP 413 before they are read "
                                           "(TGI's --payload-limit, 2 MB by default). The "
                                           "default holds a prompt at the character bound "
                                           "written as \\uXXXX escapes.")
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="ESS_BODY_TIMEOUT_SECONDS: time a client has to send its whole "
                                "request body; past it HTTP 408 (nginx's client_body_timeout).")
    max_num_seqs: int = Field(
        8, ge=1, le=256, description="ESS_MAX_NUM_SEQS: requests decoded together in the running "
                                     "batch (continuous batching); more wait in the queue.")
    max_batched_tokens: int = Field(
        4096, ge=1, description="ESS_MAX_BATCHED_TOKENS: tokens one prefill may take (each "
                                "request's prompt, its [CLS] and, with safety on, the first check's "
                                "candidate slots); requests past it join at a later step (a longer "
                                "prompt runs alone).")
    prefill_chunk: int = Field(
        64, ge=0, description="ESS_PREFILL_CHUNK: a join whose prompt is longer than this "
                                         "(tokens) prefills in chunks of it, one per decode step, so "
                                         "running streams are not stalled by a whole prompt; 0: off.")
    max_waiting: int = Field(
        64, ge=0, description="ESS_MAX_WAITING: requests queued behind the running batch; more "
                              "get HTTP 429.")
    request_timeout_seconds: float | None = Field(
        None, gt=0, description="ESS_REQUEST_TIMEOUT_SECONDS: a request still waiting or running "
                                "this long after it arrived is stopped (HTTP 504, or an error event "
                                "on a stream); unset: no limit.")
    shutdown_timeout_seconds: float = Field(
        30.0, ge=0, description="ESS_SHUTDOWN_TIMEOUT_SECONDS: on SIGTERM/SIGINT, how long running "
                                "requests may drain before they are aborted (a stream then ends "
                                "with an error event); meanwhile /health and new requests get "
                                "503 (server/lifecycle.py).")
    keep_alive_on_engine_death: bool = Field(
        False, description="ESS_KEEP_ALIVE_ON_ENGINE_DEATH: when the engine thread dies (a bug "
                           "outside the decode step), keep the server up answering 503 instead of "
                           "exiting with status 1 for a supervisor to restart (vLLM's "
                           "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH; server/lifecycle.py).")
    retry_after_seconds: int = Field(
        1, ge=0, description="ESS_RETRY_AFTER_SECONDS: Retry-After header value on HTTP 429.")
    sse_ping_seconds: float = Field(
        15.0, ge=0, description="ESS_SSE_PING_SECONDS: keep-alive comment interval on streams "
                                "(0 disables).")
    log_level: Literal[tuple(LOG_LEVELS)] = Field(
        "info", description="ESS_LOG_LEVEL: the least severe level logged, for uvicorn's loggers and "
                            "ours (`critical`, `error`, `warning`, `info`, `debug`, `trace`; any case); "
                            "`warning` drops the per-request access lines and the startup INFO lines.")

    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), repr=False,
        description="ESS_API_KEYS: comma-separated API keys; when set, every route except "
                    "/health (and /metrics, see ESS_METRICS_REQUIRE_AUTH) needs "
                    "`Authorization: Bearer <key>` with one of them (else HTTP 401). Unset or "
                    "empty: no authentication. Never printed (repr=False).")
    metrics_require_auth: bool = Field(
        False, description="ESS_METRICS_REQUIRE_AUTH: `true` puts /metrics behind the API keys "
                           "too; default false, so a Prometheus scraper needs no key.")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="ESS_CORS_ORIGINS: comma-separated origins allowed to call the API from "
                        "a browser (`*` for any); unset or empty: no CORS headers at all.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        """``"a, b,,c"`` (the environment's form) -> ``("a", "b", "c")``; lists pass through."""
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def resolved_base_model_dir(self) -> Path:
        """The base-model folder to load: the setting, or the cache default."""
        if self.base_model_dir is not None:
            return self.base_model_dir
        from safety_decoding.base_model import base_model_dir

        return base_model_dir()


def server_safety_params(settings: Settings, checkpoint_config):
    """The server's `SafetyParams`: settings where given, else the checkpoint's `SafetyConfig`
    (`SafetyParams.from_config`).

    Raises:
        ParameterError: a combination the library rejects.
    """
    from safety_decoding.policy import SafetyParams

    return SafetyParams.from_config(
        checkpoint_config, enabled=settings.safety_enabled, threshold=settings.safety_threshold,
        tau=settings.safety_tau, r1=settings.safety_r1, r2=settings.safety_r2,
        r3=settings.safety_r3, schedule=settings.safety_schedule, period=settings.safety_period,
        action=settings.safety_action)
