"""Scale-out with Ray Serve: ``ess serve --ray --replicas N [--max-replicas M]``.

Each replica is one whole ESS app (`bootstrap.build_app`: its own engine thread and model) behind
Ray Serve's HTTP proxy, so routes, streaming, errors and API keys are the single server's.
Ray sends a replica at most ``ESS_MAX_NUM_SEQS`` requests at once (``max_ongoing_requests``:
one running batch, so the replica's own queue stays empty), holds up to ``ESS_MAX_WAITING``
more in the proxy (``max_queued_requests``, a bound Ray applies approximately at a burst:
docs/operations.md) and answers HTTP 503 past that: the load shedding that a single server does
with 429. With ``max_replicas`` it autoscales on ongoing requests
per replica. A client that disconnects cancels its request in the replica, whose engine aborts
it at the next step boundary, as without Ray.

Ray is the optional extra ``ray`` (``pip install 'ess-serve[ray]'``); importing this module
does not import it. Metrics: each replica keeps its own registry, and ``/metrics`` through the
proxy answers from one replica at a time; scrape replicas one by one (one pod per replica, as
docker/k8s does) where dashboards need every series.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from .settings import Settings

APP_NAME = "ess"


@dataclass(frozen=True)
class RayOptions:
    """How ``ess serve --ray`` deploys.

    Raises:
        ValueError: a field out of range (the message names it).
    """

    replicas: int = 1
    """Replicas; the autoscaling minimum when ``max_replicas`` is set."""
    max_replicas: int | None = None
    """Autoscale between ``replicas`` and this many; None: a fixed count."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves for each replica (and the torch threads it gets)."""
    address: str | None = None
    """An existing Ray cluster (``ray://...`` or ``auto``); None: start a local one."""

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError("replicas: must be >= 1")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError("max_replicas: must be >= replicas")
        if self.replica_cpus <= 0:
            raise ValueError("replica_cpus: must be > 0")


class ESSReplica:
    """One Ray Serve replica: the ESS app of ``settings`` (a `Settings` JSON dump), on
    ``decoder_factory()`` when given (a tiny model in tests), else on the settings'
    checkpoint. Ray builds the app in the replica (``__serve_build_asgi_app__``) and runs its
    lifespan, which starts and warms the engine."""

    def __init__(self, settings: dict, decoder_factory=None):
        self._settings = settings
        self._factory = decoder_factory
        self._app = None

    def __serve_build_asgi_app__(self):
        from .bootstrap import build_app

        settings = Settings(**self._settings)
        decoder = self._factory() if self._factory is not None else None
        self._app = build_app(settings, decoder=decoder)
        return self._app

    async def check_health(self) -> None:
        """Ray's periodic replica check: the engine thread is alive and warm.

        Raises:
            RuntimeError: it is not (Ray then replaces the replica).
        """
        if self._app is not None and not self._app.state.engine.ready:
            raise RuntimeError("the ESS engine is not running")


def ray_app(settings: Settings, options: RayOptions, decoder_factory=None):
    """The bound Ray Serve application (pass to ``serve.run``).

    ``decoder_factory``: a picklable no-argument callable returning a `Decoder`, built in each
    replica; None loads ``settings.checkpoint``.
    """
    from ray import serve

    config = dict(
        name=APP_NAME,
        max_ongoing_requests=settings.max_num_seqs,
        max_queued_requests=settings.max_waiting,
        ray_actor_options={"num_cpus": options.replica_cpus},
        # Ray waits this long for running requests before it stops a replica.
        graceful_shutdown_timeout_s=settings.shutdown_timeout_seconds,
        health_check_period_s=10,
        health_check_timeout_s=30,
    )
    if options.max_replicas is not None:
        config["autoscaling_config"] = {
            "min_replicas": options.replicas,
            "max_replicas": options.max_replicas,
            # Half a batch per replica: a new replica needs a model load before it helps, so
            # scale before the running batches are full.
            "target_ongoing_requests": max(1.0, settings.max_num_seqs / 2),
            # Average ongoing requests over 15 s (Ray's default: 30) and act 10 s after a
            # decision holds: a burst gets a replica in about half a minute; scale down slowly.
            "look_back_period_s": 15,
            "upscale_delay_s": 10,
            "downscale_delay_s": 300,
        }
    else:
        config["num_replicas"] = options.replicas
    deployment = serve.deployment(serve.ingress()(ESSReplica), **config)
    return deployment.bind(settings.model_dump(mode="json"), decoder_factory)


def run_ray(settings: Settings, options: RayOptions) -> int:
    """Start (or join) a Ray cluster, serve on ``settings.host:port`` until SIGINT/SIGTERM,
    then stop the deployment (running requests drain first). Returns the exit status.

    Raises:
        ServeError: Ray Serve is not installed.
    """
    from .bootstrap import ServeError

    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ServeError("Ray Serve is not installed: pip install 'ess-serve[ray]'") from exc

    ray.init(address=options.address, include_dashboard=False)
    # SIGTERM (a container stop) ends the blocking serve.run like Ctrl-C does; set after
    # ray.init, which installs a handler of its own that exits without draining.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(ray_app(settings, options), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        # Delete the app first: its replicas drain running requests (up to
        # ESS_SHUTDOWN_TIMEOUT_SECONDS) while the proxy still streams them; serve.shutdown
        # alone kills the proxy at once and cuts the streams.
        try:
            serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0
