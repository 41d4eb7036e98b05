"""Start-up: resolve the prepared base model, load the checkpoint and build the app around an
`Engine` (`build_app`); shared by ``ess serve``, ``ess trace`` and the Ray Serve replicas."""

from __future__ import annotations

import sys
from pathlib import Path


class ServeError(RuntimeError):
    """The server cannot start; the message is one line saying what to do."""


def resolve_base_model(base_dir: Path | None) -> Path:
    """The prepared base-model folder: ``base_dir``, or the cache (prepared when missing).

    Raises:
        ServeError: preparation failed, or ``base_dir`` is not a prepared model.
    """
    from safety_decoding.base_model import PrepareError, prepare_base_model

    if base_dir is None:
        try:
            return prepare_base_model(log=lambda msg: print(msg, file=sys.stderr))
        except PrepareError as exc:
            raise ServeError(str(exc)) from exc
    if not (base_dir / "config.json").exists():
        raise ServeError(f"{base_dir} is not a prepared base model (no config.json); run "
                         "`ess prepare` and omit --base-model, or point it at that folder")
    return base_dir


def build_app(settings, decoder=None):
    """Build the app (not started) around ``decoder``; when None, prepare the base model if
    needed and load the checkpoint of ``settings``.

    Raises:
        ServeError: preparation failed, the base folder is missing, or the checkpoint is bad.
    """
    from safety_decoding.decode import Decoder
    from safety_decoding.model import CheckpointError
    from safety_decoding.types import ParameterError, Quantization

    from .app import create_app
    from .engine import Engine, load_off_thread

    def load() -> Decoder:
        base = resolve_base_model(settings.base_model_dir)
        try:
            return Decoder.from_checkpoint(settings.checkpoint, base, settings.device, settings.dtype,
                                           fused=settings.fused_forward, quantization=settings.quantization,
                                           first_check=settings.first_check_candidates, compile=settings.compile)
        except (CheckpointError, ValueError) as exc:
            raise ServeError(str(exc)) from exc

    if settings.quantization != Quantization.NONE and settings.safety_enabled:
        # Measured, not assumed: benchmarks/results/quant_agreement.json.
        print("warning: ESS_QUANTIZATION=int8 changes 4-6 % of the safety head's query verdicts "
              "against the float32 ones its threshold was calibrated on, and flags fewer harmful "
              "requests (python -m benchmarks.quant_agreement)", file=sys.stderr)
    if decoder is None:
        decoder = load_off_thread(load)
    engine = Engine(decoder, max_num_seqs=settings.max_num_seqs,
                    max_batched_tokens=settings.max_batched_tokens, max_waiting=settings.max_waiting,
                    request_timeout=settings.request_timeout_seconds,
                    prefill_chunk=settings.prefill_chunk or None)
    try:
        return create_app(engine, settings)
    except ParameterError as exc:
        raise ServeError(f"safety settings: {exc}") from exc
