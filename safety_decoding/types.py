"""Names shared by the runtime, the server, training and evaluation: finish reasons, re-check
schedules, safety actions, weight quantization, LoRA rows, and the parameter error. One place
per name; everything else imports these instead of spelling the strings.

The enums subclass ``str`` so that they compare equal to, serialise as (JSON, Prometheus
labels, pydantic) and format as their plain value.
"""

from __future__ import annotations

from enum import Enum


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The wire values in declaration order (for ``Literal[...]`` types and CLI choices)."""
        return tuple(m.value for m in cls)


class FinishReason(_StrEnum):
    """Why a request left the batch (TGI's names; the OpenAI layer maps `EOS` and
    `STOP_SEQUENCE` to ``"stop"``)."""

    LENGTH = "length"
    EOS = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CONTENT_FILTER = "content_filter"
    """The safety signal intervened (reported instead of the loop's own reason)."""
    ABORT = "abort"
    ERROR = "error"
    TIMEOUT = "timeout"


class Schedule(_StrEnum):
    """When the ``[CLS]`` probe re-checks, densest first (a request may only move to a denser
    one than the server's): docs/method.md, "Strategic decoding: schedules"."""

    EACH = "each"
    ANNEALING = "annealing"
    PERIODIC = "periodic"
    FIRST = "first"


class Action(_StrEnum):
    """What a tripped check does, strongest first: insert the refusal, bias the logits toward
    it, or only record the verdict."""

    REFUSE = "refuse"
    REWEIGHT = "reweight"
    MONITOR = "monitor"


class LoraRows(_StrEnum):
    """Which rows of a forward the checkpoint's LoRA adapter runs on (`model.SafetyConfig`)."""

    ALL = "all"
    """Every row: the adapter is merged into the weights for serving, and the response's token
    rows read ``[CLS]`` (the paper's design)."""
    SAFETY = "safety"
    """Only ``[CLS]`` and probe rows; token rows run the base model's weights and never read
    ``[CLS]``, so the language model is exactly the base model and only the signal can refuse
    (docs/method.md, "Decision 17")."""


class ParameterError(ValueError):
    """A parameter is out of range; ``field`` names it (the HTTP layer maps it to a 4xx)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Quantization(_StrEnum):
    """How the fused forward stores its projection weights (``ESS_QUANTIZATION``,
    `fused.check_quantization`)."""

    NONE = "none"
    """The model's dtype."""
    INT8 = "int8"
    """int8 weights per output channel, activations quantized to 8 bits per call (fbgemm's
    dynamic quantization; CPU, float32 activations only); the MLP's down projection stays float
    (`fused` says why)."""
