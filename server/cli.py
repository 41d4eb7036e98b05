"""``ess`` console entry point: prepare, train, serve, bench (as ``vllm serve`` / ``vllm bench``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .settings import DEFAULT_CHECKPOINT  # noqa: F401  (kept importable from here)


def _prepare(args) -> int:
    from safety_decoding.base_model import PrepareError, prepare_base_model

    try:
        print(prepare_base_model(force=args.force))
    except PrepareError as exc:
        print(f"ess prepare: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _train(args) -> int:
    from safety_decoding.base_model import PrepareError, prepare_base_model
    from safety_decoding.train import load_train_config, train

    cfg = load_train_config(args.config)
    try:
        base = prepare_base_model()
    except PrepareError as exc:
        print(f"ess train: error: {exc}", file=sys.stderr)
        return 1
    train(cfg, base)
    return 0


def _serve(args) -> int:
    """Load the checkpoint, warm the engine, serve HTTP until interrupted (exit status)."""
    from pydantic import ValidationError

    from .settings import Settings

    overrides = {k: v for k, v in (("checkpoint", args.checkpoint), ("host", args.host),
                                   ("port", args.port), ("base_model_dir", args.base_model))
                 if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        print(f"ess serve: error: {field}: {first['msg']}", file=sys.stderr)
        return 1
    try:
        app = build_app(settings)
    except ServeError as exc:
        print(f"ess serve: error: {exc}", file=sys.stderr)
        return 1
    import uvicorn

    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


class ServeError(RuntimeError):
    """The server cannot start; the message is one line saying what to do."""


def build_app(settings):
    """Prepare the base model if needed, load the checkpoint, and build the app (not started).

    Raises:
        ServeError: preparation failed, the base folder is missing, or the checkpoint is bad.
    """
    from transformers import AutoTokenizer

    from safety_decoding.base_model import PrepareError, prepare_base_model
    from safety_decoding.decode import Decoder
    from safety_decoding.model import CheckpointError, load_safety_model
    from safety_decoding.sampling import ParameterError

    from .app import create_app
    from .engine import Engine

    if settings.base_model_dir is None:
        try:
            base = prepare_base_model(log=lambda msg: print(msg, file=sys.stderr))
        except PrepareError as exc:
            raise ServeError(str(exc)) from exc
    else:
        base = settings.base_model_dir
        if not (base / "config.json").exists():
            raise ServeError(f"{base} is not a prepared base model (no config.json); run "
                             "`ess prepare` and omit --base-model, or point it at that folder")
    try:
        model = load_safety_model(settings.checkpoint, base)
    except CheckpointError as exc:
        raise ServeError(str(exc)) from exc
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    engine = Engine(Decoder(model, tokenizer), max_waiting=settings.max_waiting)
    try:
        return create_app(engine, settings)
    except ParameterError as exc:
        raise ServeError(f"safety settings: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ess", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download and convert the base model into the cache")
    p.add_argument("--force", action="store_true", help="convert again even if present")
    p.set_defaults(func=_prepare)
    p = sub.add_parser("train", help="fine-tune a checkpoint with the explicit safety signal")
    p.add_argument("--config", required=True, help="YAML file of TrainConfig keys")
    p.set_defaults(func=_train)
    p = sub.add_parser("serve", help="serve the TGI-style HTTP API (settings: ESS_* variables)")
    p.add_argument("--checkpoint", type=Path, help="ESS checkpoint folder (ESS_CHECKPOINT)")
    p.add_argument("--base-model", type=Path,
                   help="prepared base-model folder (ESS_BASE_MODEL_DIR; default: the cache)")
    p.add_argument("--host", help="address to bind (ESS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (ESS_PORT, default 8000)")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
