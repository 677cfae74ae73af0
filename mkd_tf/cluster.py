"""Multi-worker training: `TF_CONFIG`, the MultiWorkerMirroredStrategy, who is chief, state from the chief.

Every worker runs the same `mkd train` command with its own `TF_CONFIG`, e.g. on the first of two machines::

    TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}, "task": {"type": "worker", "index": 0}}'

The chief (the `chief` task, or worker 0 when the cluster has none) writes the run folder; the others
only train. A bad `TF_CONFIG` is one line naming it (:func:`read_tf_config`); a cluster that does not
come together, or loses a worker, stops every worker within ``timeout`` seconds with one line
(:func:`describe_failure`) instead of hanging.
"""

import json
import os
import sys
import tempfile

import tensorflow as tf

from mkd_tf import private_api
from mkd_tf.errors import fail

#: the task types this trainer runs (parameter servers and evaluators belong to other strategies)
JOBS = ("chief", "worker")

#: where TensorFlow's native log goes during a multi-worker run (see :func:`divert_native_log`)
NATIVE_LOG = {"path": None}


def divert_native_log():
    """Send file descriptor 2 (TensorFlow's C++ log: gRPC, coordination service, collective aborts, often
    a dozen lines per failure) to a temporary file, while Python's `sys.stderr` (mkd's one-line errors)
    keeps the terminal. The errors name the file; a run that ends normally deletes it."""
    if NATIVE_LOG["path"] is not None:
        return NATIVE_LOG["path"]
    sys.stderr.flush()
    terminal = os.dup(2)
    handle, path = tempfile.mkstemp(prefix="mkd-tensorflow-log-", suffix=".txt")
    os.dup2(handle, 2)
    os.close(handle)
    sys.stderr = os.fdopen(terminal, "w", buffering=1)
    NATIVE_LOG["path"] = path
    return path


def discard_native_log():
    """Delete the diverted log after a run that ended normally."""
    if NATIVE_LOG["path"] is not None:
        try:
            os.unlink(NATIVE_LOG["path"])
        except OSError:
            pass


def _log_hint():
    return f" (TensorFlow's log: {NATIVE_LOG['path']})" if NATIVE_LOG["path"] else ""


def read_tf_config(environ=None):
    """The parsed and checked `TF_CONFIG`, or None when it is unset or empty.

    Fails with one line naming `TF_CONFIG` when it is not JSON, names no workers, has a task that is
    not in the cluster, or an address that is not `host:port`.
    """
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail("TF_CONFIG", f"is not valid JSON ({exc})")
    if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict):
        fail("TF_CONFIG", 'must be a JSON object with a "cluster" mapping and a "task"')
    cluster, task = value["cluster"], value.get("task")
    unknown = sorted(set(cluster) - set(JOBS))
    if unknown:
        fail("TF_CONFIG", f"cluster job '{unknown[0]}' is not supported by mkd train (only {', '.join(JOBS)})")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            fail("TF_CONFIG", f'cluster "{job}" must be a non-empty list of "host:port" addresses')
        for address in addresses:
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                fail("TF_CONFIG", f'address {address!r} of "{job}" is not "host:port"')
    if len(cluster.get("chief", [])) > 1:
        fail("TF_CONFIG", 'a cluster has at most one "chief"')
    if not isinstance(task, dict) or task.get("type") not in cluster:
        fail("TF_CONFIG", f'"task" must name a job of the cluster ({", ".join(cluster)}), got {task!r}')
    index = task.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[task["type"]]):
        fail("TF_CONFIG", f'task index {index!r} is not in [0, {len(cluster[task["type"]])}) for "{task["type"]}"')
    return {"cluster": cluster, "task": {"type": task["type"], "index": index}}


def worker_count(tf_config):
    """Number of training tasks (chief + workers) in a parsed `TF_CONFIG`; 0 without one."""
    if not tf_config:
        return 0
    return sum(len(tf_config["cluster"].get(job, [])) for job in JOBS)


def is_chief_task(tf_config):
    """Whether this task writes the run folder: the `chief`, or worker 0 when there is no chief."""
    task = tf_config["task"]
    if "chief" in tf_config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def task_name(tf_config):
    return f"{tf_config['task']['type']} {tf_config['task']['index']}"


def describe_failure(exc, tf_config, timeout):
    """One line for a collective operation that failed: a worker died, restarted, or timed out."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    for marker in ("Collective ops is aborted by: ", "aborted by: "):
        if marker in str(exc):
            first = str(exc).split(marker, 1)[1].splitlines()[0]
            break
    return (
        f"{task_name(tf_config)}: lost the cluster ({type(exc).__name__}: {first[:200]}); "
        f"a worker died, restarted or was slower than worker_timeout={timeout:g} s. "
        "Relaunch every worker with the same command to resume from the chief's last checkpoint" + _log_hint()
    )


def make_multi_worker_strategy(timeout, tf_config):
    """A MultiWorkerMirroredStrategy on the cluster of ``tf_config`` (parsed `TF_CONFIG`).

    ``timeout`` (seconds) bounds the wait for every task at start (the coordination service's
    registration) and each collective operation (CommunicationOptions), and sets the heartbeat after
    which a silent peer counts as dead. Call it before anything initialises TensorFlow's context (an op,
    a tensor, listing logical devices): the coordination service and collectives are configured at
    program start-up. `mkd train` does (the CLI loads TensorFlow without initialising the context).
    """
    if private_api.context_initialized():  # e.g. a notebook that already ran TensorFlow
        fail(
            "TF_CONFIG",
            f"{task_name(tf_config)}: multi-worker training must start before this process runs anything in "
            "TensorFlow (its cluster is configured at start-up); start it in a new process",
        )
    divert_native_log()
    cluster_spec = tf.train.ClusterSpec(tf_config["cluster"])
    # The strategy would configure the coordination service itself, with no registration timeout (a
    # chief that never comes up is waited for forever). Configure it first, with bounds.
    private_api.configure_coordination_service(tf_config["cluster"], timeout)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster_spec, task_type=tf_config["task"]["type"], task_id=tf_config["task"]["index"], rpc_layer="grpc"
    )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(timeout))
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
        # A first collective: every worker is up and reachable (else this fails within the timeout).
        one = tf.function(
            lambda: strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)
        )
        one().numpy()
    except (tf.errors.OpError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        fail(
            "TF_CONFIG",
            f"{task_name(tf_config)} could not join the cluster {json.dumps(tf_config['cluster'])} "
            f"within {timeout:g} s ({type(exc).__name__}: {first}){_log_hint()}",
        )
    return strategy


def broadcast_from_chief(strategy, variables):
    """Give every worker the chief's values of ``variables`` (after the chief alone restored them).

    One all-reduce in which replica 0, the chief's first device, contributes the values and every other
    replica zeros: exact for floats and integers alike.
    """
    handles = list(variables)  # tf.Variables (a Keras variable's `.value`)
    # One all-reduce per dtype (a batched all-reduce concatenates its tensors); integers travel as
    # float64, exact below 2**53 (step counters).
    wire = [tf.float64 if h.dtype.is_integer else h.dtype for h in handles]
    groups = {}
    for index, dtype in enumerate(wire):
        groups.setdefault(dtype, []).append(index)

    def contribute():
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        out = [None] * len(handles)
        for dtype, indices in groups.items():
            values = [tf.cast(handles[i], dtype) for i in indices]
            values = [tf.where(first, v, tf.zeros_like(v)) for v in values]
            for i, value in zip(indices, context.all_reduce(tf.distribute.ReduceOp.SUM, values)):
                out[i] = value
        return out

    results = tf.function(lambda: strategy.run(contribute))()
    for handle, result in zip(handles, results):
        handle.assign(tf.cast(strategy.experimental_local_results(result)[0], handle.dtype))
