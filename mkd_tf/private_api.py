"""The TensorFlow internals mkd-tf still uses: all of them, each with why no public API does the job.

Everything else in ``mkd_tf/`` and ``cli/`` uses the public ``tf.*`` / ``keras.*`` API: tests/test_private_api.py
fails on a private TensorFlow or Keras attribute, or a ``tensorflow.python`` / ``keras.src`` import, anywhere
else. :data:`PINNED` lists the internals used here; the same test checks that each one still exists, so a
TensorFlow upgrade that removes one fails there, naming it, rather than in a multi-worker job.
"""

import inspect

from tensorflow.python.distribute import multi_worker_util
from tensorflow.python.distribute.collective_all_reduce_strategy import coordination_config_pb2
from tensorflow.python.eager import context

#: the keyword arguments :func:`configure_coordination_service` passes to TensorFlow
COORDINATION_ARGUMENTS = (
    "service_type",
    "service_leader",
    "cluster_register_timeout_in_ms",
    "heartbeat_timeout_in_ms",
    "shutdown_barrier_timeout_in_ms",
    "coordinated_jobs",
)


def context_initialized() -> bool:
    """Whether TensorFlow's eager context is initialised (devices and its configuration fixed).

    Returns:
        True once an op ran, a tensor was made or logical devices were listed.
    """
    return context.context()._context_handle is not None


def configure_coordination_service(cluster: dict, timeout: float) -> None:
    """Configure TensorFlow's coordination service for a multi-worker ``cluster`` with bounded waits.

    MultiWorkerMirroredStrategy would configure the service itself, with no registration timeout (a worker
    whose chief never comes up waits forever) and no public way to set one; configured here first, the
    strategy keeps this configuration. Must run before TensorFlow's context is initialised.

    Args:
        cluster: ``{"worker": ["host:port", ...], "chief": [...]}`` (a parsed ``TF_CONFIG``'s cluster).
        timeout: seconds every task has to register; also bounds the shutdown barrier and (10-60 s) the
            heartbeat after which a silent peer counts as dead.

    Raises:
        RuntimeError: the context is already initialised (the configuration would silently not apply).
    """
    if context_initialized():
        raise RuntimeError(
            "the coordination service must be configured before TensorFlow's context is initialised "
            "(before any op runs or devices are listed)"
        )
    milliseconds = int(timeout * 1000)
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        cluster_register_timeout_in_ms=milliseconds,
        heartbeat_timeout_in_ms=max(10_000, min(milliseconds, 60_000)),
        shutdown_barrier_timeout_in_ms=milliseconds,
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(tasks)) for job, tasks in cluster.items()
        ],
    )


def _accepts(function, names):
    absent = [name for name in names if name not in inspect.signature(function).parameters]
    if absent:
        raise AttributeError(f"no argument {', '.join(absent)}")
    return function


#: ``(internal, why it is used, a check that raises AttributeError when it is gone)``
PINNED = (
    (
        "tensorflow.python.eager.context.context().configure_coordination_service",
        "the only way to bound the wait for the cluster (see configure_coordination_service)",
        lambda: _accepts(context.context().configure_coordination_service, COORDINATION_ARGUMENTS),
    ),
    (
        "tensorflow.python.eager.context.context()._context_handle",
        "no public query tells whether the context is initialised (see context_initialized)",
        lambda: context.context()._context_handle,
    ),
    (
        "tensorflow.python.distribute.multi_worker_util.coordination_leader",
        "the service's leader task, chosen as the strategy chooses it",
        lambda: multi_worker_util.coordination_leader,
    ),
    (
        "tensorflow.python.distribute.collective_all_reduce_strategy.coordination_config_pb2.CoordinatedJob",
        "the service's job list, from the protobuf module the strategy itself uses",
        lambda: coordination_config_pb2.CoordinatedJob,
    ),
)


def missing() -> list[str]:
    """The internals of :data:`PINNED` this TensorFlow no longer has.

    Returns:
        One ``internal: problem (why it is used)`` line per missing internal; empty when all are there.
    """
    problems = []
    for name, why, check in PINNED:
        try:
            check()
        except AttributeError as exc:
            problems.append(f"{name}: {exc} (used because {why})")
    return problems
