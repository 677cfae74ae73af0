"""What one training step costs: FLOPs counted from the traced graph, achieved GFLOP/s against a
measured conv peak, and the price of multi-worker training (run by hand; not a test).

    .venv/bin/python benchmarks/training_cost.py                  # = --size 48 256 --steps 5 --workers 1 2
    .venv/bin/python benchmarks/training_cost.py --size 48 --methods target-only mkd --steps 3 --out /tmp/cost
    .venv/bin/python benchmarks/training_cost.py --steps 0        # FLOPs only (tracing, ~3 min)
    .venv/bin/python benchmarks/training_cost.py --breakdown --size 48 256   # MKD's FLOPs by part + candidates

``--breakdown`` (FLOPs only, ~30 min on a loaded 2-core machine: tracing) writes
``benchmarks/results/training_cost_breakdown.md`` (+ ``.json``): one MKD distillation step and one warm-start step
split into their parts (MKDModel's name scopes: each segmentor pass, the generators, the cycle, the
discriminators, the structure loss, each forward with its backward, and the optimizer updates), and every
``CANDIDATES`` entry (a cheaper IAM setting or variant) per step and per run against joint. It also counts
**executed** FLOPs: only the ops a call runs (ancestors of the step's outputs and stateful ops); the graph count
below includes gradients the tape builds but no optimizer takes, which the ``tf.function`` prunes.

A method with a warm start (``mkd``) also gets a row ``mkd (run average)``: its two steps weighted by their
shares of a run (``schedule.mkd_pretrain`` warm start, the rest distillation).

Expected duration of the default (full) run on 2 idle cores: roughly 1.5-2.5 h (estimated from the
counted FLOPs and 30-45 GFLOP/s, not measured); about two thirds of it is 256 x 256 ``mkd`` (5.9 TFLOP
per step, ~2-3 min per step, timed in this process and under 1 and 2 workers). Its peak memory is
estimated at ~10 GB (extrapolated from 96 x 96). ``--steps 3`` or ``--size 48`` shortens it.

Writes ``OUT.json`` (everything, incl. every step time) and ``OUT.md`` (the tables, also printed);
``--out`` defaults to ``benchmarks/results/training_cost``. Not collected by pytest (no ``test_``).

What is measured, per slice size and method (built by ``mkd_tf.training.build_method`` exactly as
``mkd train`` builds it; float32, no XLA; one fixed synthetic batch of 8 classes, every stream
``batch`` slices, so no input pipeline is timed):

- Networks: sizes <= 64 use ``benchmarks/compare_phantom.yaml`` (the phantom comparison's small
  networks, ``networks = phantom``); larger sizes use the config DEFAULTS (``networks = defaults``).
  ``--config YAML`` forces one config for every size.
- The step is ``mkd_tf.trainer.step_functions(strategy, model)``'s ``tf.function`` (the one ``mkd
  train`` calls), traced with fixed shapes. For ``mkd`` the row ``mkd`` is the mutual-distillation
  step (``train_step``); ``mkd (warm start)`` is its ``pretrain_step``, run for the first
  ``schedule.mkd_pretrain`` of the steps (70 % by default; 50 % when the README's cost tables were
  measured). ``finetune`` has a ``tf.cond`` over its two phases (same cost each); the timed steps run
  the assistant phase.

Columns of the FLOP table:

- ``GFLOP/step``: floating-point operations of one step (forward + gradients + optimizer updates)
  counted from the concrete function's graph with TensorFlow's FLOP registry (the statistics
  ``tf.compat.v1.profiler`` uses: 2 FLOPs per multiply-add for Conv2D, Conv2DBackpropInput,
  Conv2DBackpropFilter, MatMul, one per element for element-wise ops and reductions; ops without a
  registered count, e.g. Relu, Pad, Cast, count 0), recursing into nested functions (``tf.cond``
  branches: the costlier branch);
- ``profiler GFLOP``: ``tf.compat.v1.profiler.profile(graph, float_operation())`` on the same graph,
  which sees only its top level (it misses the ops inside ``tf.cond`` branches: finetune);
- ``conv %``: share of convolutions (forward and both gradient convolutions) in ``GFLOP/step``;
- ``bwd %``: share of gradient ops (ops the tape created under ``gradient_tape/``, plus the ``AddN``
  gradient sums); ``opt %``: share of the optimizers' updates (Adam, moving averages);
- ``s/step``: median seconds per step after ``--warmup`` steps, default strategy, this process
  (each step ends with reading the losses, as the training loop does);
- ``GFLOP/s``: ``GFLOP/step / s/step``; ``% peak``: of the conv peak below.

``conv peak``: GFLOP/s of one large ``tf.nn.conv2d`` forward in a ``tf.function`` (8 x 64 x 64 x 128
-> 128, 3 x 3, 9.66 GFLOP counted by hand as 2 * B * H * W * k * k * Cin * Cout; on the 2-core test
machine this shape ran ~5 x faster than 8 x 128 x 128 x 64 -> 64 of the same FLOPs), the fastest of
``--peak-repeats`` calls, measured at the start and at the end of the run; the higher is used. The same
conv checks the counter: the profiler's count of it must equal the hand count, and the convolutions of
its forward + gradients three times it (Conv2DBackpropInput and Conv2DBackpropFilter are counted).

``peak RSS MiB``: the process's peak resident memory while the step was timed (Linux ``VmHWM``, reset
before; it includes what earlier measurements left allocated). The JSON has the workers' too.

``spread %``: (slowest - fastest) / median of the timed steps: timings whose differences are within it
are noise (expect a lot of it on a loaded machine).

Columns of the strategy table (``--workers``, each count N is N local processes on 127.0.0.1 running
the same step under ``MultiWorkerMirroredStrategy`` via ``mkd_tf.cluster``, each with its block of the
same global batch; N = 1 is a single-worker ``TF_CONFIG``):

- ``default steps/s``: 1 / ``s/step`` above (default strategy, one process);
- ``MWMS xN steps/s``: 1 / the chief's median seconds per step with N workers;
- ``MWMS x1 overhead s/step``: median s/step of MWMS x1 - default, seconds per step of the
  multi-worker machinery itself (collective all-reduce of every gradient and loss, coordination) with
  one worker;
- ``speed-up xN``: ``MWMS xN steps/s / default steps/s``.

All workers share this machine's cores: on a 2-core CPU, two workers get one core each where one
process used both (``--worker-threads`` sets each worker's intra-op threads; 0 = TensorFlow's
default, every core, i.e. oversubscribed). A speed-up measured here says nothing about two machines.
Record the load (``os.getloadavg``, in the output): other processes on the CPU slow every column.
"""

import argparse
import collections
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

METHODS = ("mkd", "ummkd", "finetune", "target-only", "joint", "assistant-only")
PHANTOM_CONFIG = ROOT / "benchmarks" / "compare_phantom.yaml"
PHANTOM_MAX_SIZE = 64  # sizes up to this use the phantom comparison's networks
NUM_CLASSES = 8
STREAMS = ("assistant", "target", "target_labelled")
CONV_OPS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")
#: the large conv of the peak measurement: batch, height, width, in channels, out channels, kernel
PEAK_CONV = (8, 64, 64, 128, 128, 3)


# --- configs and batches -------------------------------------------------------------------------------


def network_choice(size, config_path):
    """``(yaml path or None, label)`` of the networks used at ``size``."""
    if config_path:
        return str(config_path), Path(config_path).name
    if size <= PHANTOM_MAX_SIZE:
        return str(PHANTOM_CONFIG), "phantom"
    return None, "defaults"


def method_config(method, size, args, extra=None):
    """The config of ``method`` (a registered method or variant) at ``size`` (``extra``: nested overrides
    merged over the variant's, e.g. a candidate's)."""
    from mkd_tf import registry
    from mkd_tf.compare import run_overrides
    from mkd_tf.config import load_config

    path, _ = network_choice(size, args.config)
    variant = run_overrides(method, 0, {})
    method = variant.pop("method")
    variant.pop("seed")
    if extra:
        base = load_config(path, {**variant, "method": method})
        extra = extra(base) if callable(extra) else extra
    for section, values in (extra or {}).items():
        variant[section] = {**variant.get(section, {}), **values} if isinstance(values, dict) else values
    assert registry.method_of(method).name == method
    overrides = {
        **variant,
        "method": method,
        "strategy": "default",
        "precision": "float32",
        "jit_compile": False,
        "data": {"batch_size": args.batch_size},
    }
    return load_config(path, overrides)


def synthetic_batch(batch, size, seed=0):
    """One global batch as numpy: every stream ``batch`` labelled slices (images correlate with labels)."""
    rng = np.random.default_rng(seed)

    def stream():
        labels = rng.integers(0, NUM_CLASSES, (batch, size, size)).astype(np.int32)
        images = (labels[..., None] * 0.3 + rng.normal(0, 1, (batch, size, size, 1))).astype(np.float32)
        return {"image": images, "label": labels, "has_label": np.ones(batch, np.float32)}

    return {name: stream() for name in STREAMS}


def build_model(config, strategy, size):
    """The method's model, built with its optimizers inside ``strategy.scope()`` as ``mkd train`` does."""
    import keras

    from mkd_tf.training import build_method

    keras.utils.set_random_seed(int(config["seed"]))
    with strategy.scope():
        model = build_method(config, NUM_CLASSES)
        model.build_for((size, size, 1))
        model.build_optimizers()
    return model


def phases(model, pretrain_step, train_step):
    """``[(phase, step function)]``: the main step, and MKD's warm start when the model has one."""
    from mkd_tf.models.cross_modality import CrossModalityModel

    result = [("train", train_step)]
    if model.pretrain_steps > 0 and type(model).pretrain_step is not CrossModalityModel.pretrain_step:
        result.append(("warm start", pretrain_step))
    return result


# --- FLOPs from the graph -------------------------------------------------------------------------------


def profiler_flops(graph):
    """``tf.compat.v1.profiler``'s total float operations of ``graph`` (its top level only)."""
    import tensorflow as tf

    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)


def _function_graph(graph, name):
    """The FuncGraph of the nested function ``name`` called from ``graph`` (or an enclosing graph)."""
    while graph is not None:
        function = getattr(graph, "_functions", {}).get(name)
        if function is not None:
            return function.graph
        graph = getattr(graph, "outer_graph", None)
    raise KeyError(f"function {name} not found in the graph or its outer graphs")


#: name scopes of the Keras optimizers' updates: adam, adam_1, loss_scale_optimizer, ..., and the methods'
#: ``NAME_update`` scope around them (CrossModalityModel.step), also inside a ``tf.cond`` branch
OPTIMIZER_SCOPE = re.compile(r"(^|/)((adam|adamw|sgd|loss_scale_optimizer)(_\d+)?|\w+_update)/")


def _part(op, inherited):
    """forward, backward or optimizer (ops inside a nested function take the calling op's part)."""
    if inherited != "forward":
        return inherited
    if "gradient_tape" in op.name or op.type == "AddN":
        return "backward"
    if OPTIMIZER_SCOPE.search(op.name):
        return "optimizer"
    return "forward"


def graph_flops(graph, part="forward"):
    """FLOPs of ``graph`` with TensorFlow's FLOP registry (the profiler's), recursing into functions.

    Returns a dict: ``total``; ``by_type`` and ``by_part`` (forward / backward / optimizer) splits;
    ``missing_shape`` (ops whose count needs a shape the graph does not know: counted as 0);
    ``control_flow`` (the nested calls seen); ``largest_conv`` (shapes and count of the costliest Conv2D).
    """
    from tensorflow.python.framework import ops as tf_ops

    result = {
        "total": 0,
        "by_type": collections.Counter(),
        "by_part": collections.Counter(),
        "missing_shape": 0,
        "control_flow": collections.Counter(),
        "largest_conv": None,
    }

    def merge(inner):
        result["total"] += inner["total"]
        for key in ("by_type", "by_part", "control_flow"):
            result[key].update(inner[key])
        result["missing_shape"] += inner["missing_shape"]
        if inner["largest_conv"] and (
            not result["largest_conv"] or inner["largest_conv"]["flops"] > result["largest_conv"]["flops"]
        ):
            result["largest_conv"] = inner["largest_conv"]

    for op in graph.get_operations():
        where = _part(op, part)
        if op.type in ("If", "StatelessIf"):
            branches = [
                graph_flops(_function_graph(graph, op.get_attr(b).name), where) for b in ("then_branch", "else_branch")
            ]
            merge(max(branches, key=lambda b: b["total"]))
            result["control_flow"][f"{op.type} (costlier branch counted)"] += 1
            continue
        if op.type in ("PartitionedCall", "StatefulPartitionedCall"):
            merge(graph_flops(_function_graph(graph, op.get_attr("f").name), where))
            result["control_flow"][op.type] += 1
            continue
        if op.type in ("While", "StatelessWhile"):
            merge(graph_flops(_function_graph(graph, op.get_attr("body").name), where))
            result["control_flow"][f"{op.type} (body counted once)"] += 1
            continue
        try:
            value = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value
        except ValueError:  # an input or output shape is unknown
            result["missing_shape"] += 1
            continue
        if not value:
            continue
        value = int(value)
        result["total"] += value
        result["by_type"][op.type] += value
        result["by_part"][where] += value
        if op.type == "Conv2D" and (not result["largest_conv"] or value > result["largest_conv"]["flops"]):
            image, kernel = (tuple(t.shape.as_list()) for t in op.inputs[:2])
            result["largest_conv"] = {
                "op": op.name,
                "input": image,
                "kernel": kernel,
                "output": tuple(op.outputs[0].shape.as_list()),
                "flops": value,
            }
    return result


def hand_conv_flops(output_shape, kernel_shape):
    """2 * B * Ho * Wo * k * k * Cin * Cout: two FLOPs per multiply-add of a Conv2D."""
    batch, height, width, cout = output_shape
    kh, kw, cin, kernel_cout = kernel_shape
    assert cout == kernel_cout
    return 2 * batch * height * width * kh * kw * cin * cout


def summarise_flops(flops, profiled):
    total = flops["total"] or 1
    conv = sum(flops["by_type"].get(t, 0) for t in CONV_OPS)
    largest = flops["largest_conv"]
    hand = hand_conv_flops(largest["output"], largest["kernel"]) if largest else None
    return {
        "flops": flops["total"],
        "profiler_flops": profiled,
        "conv_share": conv / total,
        "backward_share": flops["by_part"].get("backward", 0) / total,
        "optimizer_share": flops["by_part"].get("optimizer", 0) / total,
        "by_type": dict(flops["by_type"].most_common()),
        "by_part": dict(flops["by_part"]),
        "missing_shape_ops": flops["missing_shape"],
        "control_flow": dict(flops["control_flow"]),
        "largest_conv": {**largest, "hand_flops": hand} if largest else None,
    }


# --- where an MKD step's FLOPs go ----------------------------------------------------------------------

#: MKDModel's name scopes (mkd_tf/models/mkd.py) in the order of the breakdown table, with their labels
MKD_PARTS = {
    "generator_align": "G(assistant): the aligned images",
    "segmentor_syn_on_assistant": "S_syn on assistant images (warm start)",
    "segmentor_real_on_assistant": "S_real on assistant images (warm start)",
    "segmentor_syn_on_aligned": "S_syn on aligned images",
    "segmentor_real_on_aligned": "S_real on aligned images (KD student)",
    "segmentor_real_on_labelled_target": "S_real on labelled target images",
    "segmentor_syn_on_labelled_target": "S_syn on labelled target images",
    "segmentor_real_on_target": "S_real on target images (KD teacher)",
    "segmentor_syn_on_target": "S_syn on target images (KD student)",
    "generator_target_to_assistant": "F(target)",
    "cycle_assistant": "assistant cycle F(G(assistant))",
    "cycle_target": "target cycle G(F(target))",
    "discriminators_on_translated": "discriminators on G(assistant), F(target)",
    "discriminators_on_real": "discriminators on real images",
    "structure_loss": "structure loss",
    "other": "losses, softmax, other small ops",
}
#: the optimizers (CrossModalityModel.step's ``NAME_backward`` / ``NAME_update`` scopes)
OPTIMIZERS = ("segmentors", "generators", "discriminators")


def live_ops(graph):
    """The ops of ``graph`` a call executes: the ancestors of its outputs and of its stateful ops (updates,
    variable reads). A ``tf.function`` prunes the others, e.g. the gradients the tape builds for a
    network's weights that no optimizer takes (the filter gradients of S_syn in G's loss)."""
    stack = [t.op for t in graph.outputs] + [op for op in graph.get_operations() if op._is_stateful]
    live = set()
    while stack:
        op = stack.pop()
        if op.name in live:
            continue
        live.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return live


def _scope(name):
    """``(part, kind)`` of an op name: a :data:`MKD_PARTS` key (or an optimizer's update) and one of
    ``forward``, ``backward`` (the tape names a gradient op ``gradient_tape/<forward op's name>``, whichever
    loss it belongs to), ``update``."""
    scopes = name.split("/")
    for optimizer in OPTIMIZERS:
        if f"{optimizer}_update" in scopes[:-1]:
            return f"{optimizer} update", "update"
    if scopes[0].startswith("gradient_tape") and len(scopes) > 2:
        return _known(scopes[1]), "backward"
    return _known(scopes[0]), "forward"


def _known(scope):
    scope = re.sub(r"_\d+$", "", scope)
    return scope if scope in MKD_PARTS else "other"


def scoped_flops(graph, every_k=1, live_only=True, scope=None):
    """FLOPs per ``(part, kind)`` (:func:`_scope`) of ``graph``, recursing into nested functions; ops
    inside a function are named after their own scopes when they have one, else the calling op's.
    ``live_only``: count only :func:`live_ops`. The ``tf.cond`` of ``discriminator_every`` = k counts its
    update branch 1/k of the time (its average per step); other conditionals their costlier branch."""
    from tensorflow.python.framework import ops as tf_ops

    counts = collections.Counter()
    live = live_ops(graph) if live_only else None
    for op in graph.get_operations():
        if live is not None and op.name not in live:
            continue
        part = _scope(op.name)
        if part == ("other", "forward") and scope is not None:
            part = scope
        if op.type in ("If", "StatelessIf"):
            branches = [
                scoped_flops(_function_graph(graph, op.get_attr(b).name), every_k, live_only, part)
                for b in ("then_branch", "else_branch")
            ]
            if "discriminators_every_k" in op.name:
                for key in set(branches[0]) | set(branches[1]):
                    counts[key] += branches[0][key] / every_k + branches[1][key] * (1 - 1 / every_k)
            else:
                counts.update(max(branches, key=lambda b: sum(b.values())))
            continue
        if op.type in ("PartitionedCall", "StatefulPartitionedCall", "While", "StatelessWhile"):
            body = op.get_attr("f" if "Call" in op.type else "body").name
            counts.update(scoped_flops(_function_graph(graph, body), every_k, live_only, part))
            continue
        try:
            value = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value
        except ValueError:
            continue
        if value:
            counts[part] += int(value)
    return counts


def breakdown_summary(graph, every_k):
    """``{"executed": flops, "graph": flops, "parts": {part: {kind: flops}}}`` of one step's graph."""
    executed = scoped_flops(graph, every_k)
    parts = collections.defaultdict(dict)
    for (part, kind), value in executed.items():
        parts[part][kind] = parts[part].get(kind, 0) + value
    return {
        "executed_flops": sum(executed.values()),
        "graph_flops_weighted": sum(scoped_flops(graph, every_k, live_only=False).values()),
        "parts": dict(parts),
    }


# --- timing and memory ----------------------------------------------------------------------------------


def reset_peak_rss():
    """Reset the process's peak resident memory (Linux: ``VmHWM`` restarts from the current RSS);
    returns the current RSS (MiB) or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb():
    """Peak resident memory (MiB) since :func:`reset_peak_rss` (else since the process started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, batch, steps, warmup):
    """Seconds of each of ``steps`` calls of ``step(batch, 0.0)`` after ``warmup`` calls; every call
    ends with the losses read back to Python, as `mkd train`'s loop does."""
    import tensorflow as tf

    flag = tf.constant(0.0)
    times = []
    for index in range(warmup + steps):
        started = time.perf_counter()
        losses, _ = step(batch, flag)
        {name: float(value) for name, value in losses.items()}
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def conv_peak(repeats, warmup=2):
    """GFLOP/s of a large Conv2D forward (hand-counted FLOPs) and the FLOP counter's check on it."""
    import tensorflow as tf

    batch, height, width, cin, cout, k = PEAK_CONV
    images = tf.random.normal((batch, height, width, cin))
    kernel = tf.random.normal((k, k, cin, cout)) * 0.05
    hand = hand_conv_flops((batch, height, width, cout), (k, k, cin, cout))
    forward = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))

    def forward_backward(x, w):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, "SAME"))
        return tape.gradient(loss, [x, w])

    forward_graph = forward.get_concrete_function(images, kernel).graph
    gradient_graph = tf.function(forward_backward).get_concrete_function(images, kernel).graph
    gradient_counts = graph_flops(gradient_graph)["by_type"]
    times = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        forward(images, kernel).numpy()
        if index >= warmup:
            times.append(time.perf_counter() - started)
    seconds = float(np.median(times))
    return {
        "shape": {"batch": batch, "height": height, "width": width, "in": cin, "out": cout, "kernel": k},
        "hand_flops": hand,
        "profiler_flops": profiler_flops(forward_graph),
        "profiler_flops_forward_and_gradients": profiler_flops(gradient_graph),
        "conv_flops_forward_and_gradients": {t: int(gradient_counts.get(t, 0)) for t in CONV_OPS},
        "seconds": times,
        "median_seconds": seconds,
        "best_seconds": min(times),
        "gflops_per_second": hand / min(times) / 1e9,
        "median_gflops_per_second": hand / seconds / 1e9,
        "loadavg": os.getloadavg(),
    }


# --- multi-worker runs ------------------------------------------------------------------------------------


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_workers(count, spec, timeout):
    """Run the step on ``count`` local MultiWorkerMirroredStrategy workers; the chief's timing."""
    ports = free_ports(count)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    with tempfile.TemporaryDirectory(prefix="mkd-cost-workers-") as folder:
        processes = []
        for index in range(count):
            env = dict(
                os.environ,
                TF_CPP_MIN_LOG_LEVEL="2",
                TMPDIR=folder,
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            )
            worker_spec = dict(spec, out=str(Path(folder) / f"worker{index}.json"))
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--worker-spec", json.dumps(worker_spec)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        failures = []
        for index, process in enumerate(processes):
            try:
                _, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other in processes:
                    other.kill()
                process.communicate()
                failures.append(f"worker {index}: no result within {timeout:g} s")
                continue
            if process.returncode != 0:
                failures.append(f"worker {index}: exit {process.returncode}: {err.strip()[-1500:]}")
        if failures:
            return {"workers": count, "error": "; ".join(failures)}
        reports = [json.loads((Path(folder) / f"worker{i}.json").read_text()) for i in range(count)]
    chief = reports[0]
    return {
        "workers": count,
        "replicas": chief["replicas"],
        "seconds": chief["seconds"],
        "median_seconds": float(np.median(chief["seconds"])),
        "median_seconds_per_worker": [float(np.median(r["seconds"])) for r in reports],
        "startup_seconds": chief["startup_seconds"],
        "first_step_seconds": chief["first_step_seconds"],
        "peak_rss_mb_per_worker": [r["peak_rss_mb"] for r in reports],
        "intra_op_threads": chief["intra_op_threads"],
    }


def worker_main(spec):
    """One worker of :func:`run_workers` (this script with ``--worker-spec``, ``TF_CONFIG`` set)."""
    import tensorflow as tf

    if spec["threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(int(spec["threads"]))
    from mkd_tf import cluster
    from mkd_tf.trainer import step_functions

    started = time.perf_counter()
    tf_config = cluster.read_tf_config()
    strategy = cluster.make_multi_worker_strategy(float(spec["timeout"]), tf_config)  # before TF is used
    startup = time.perf_counter() - started
    model = build_model(spec["config"], strategy, spec["size"])
    pretrain_step, train_step = step_functions(strategy, model)
    step = dict(phases(model, pretrain_step, train_step))[spec["phase"]]
    batch = synthetic_batch(spec["batch"], spec["size"])
    replicas = strategy.num_replicas_in_sync
    per_replica = spec["batch"] // replicas

    def block(context):
        i = context.replica_id_in_sync_group
        return tf.nest.map_structure(lambda a: tf.constant(a[i * per_replica : (i + 1) * per_replica]), batch)

    distributed = strategy.experimental_distribute_values_from_function(block)
    started = time.perf_counter()
    time_steps(step, distributed, 1, 0)
    first = time.perf_counter() - started
    seconds = time_steps(step, distributed, spec["steps"], max(spec["warmup"] - 1, 0))
    Path(spec["out"]).write_text(
        json.dumps(
            {
                "replicas": replicas,
                "seconds": seconds,
                "startup_seconds": startup,
                "first_step_seconds": first,
                "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )
    cluster.discard_native_log()


# --- the benchmark ----------------------------------------------------------------------------------------


def measure_method(method, size, args, label=None, extra=None):
    """FLOPs and default-strategy timing of every phase of one method (this process); ``label`` and
    ``extra`` (overrides, or a function of the base config returning them) name and set a candidate."""
    import keras
    import tensorflow as tf

    from mkd_tf.models.mkd import AUTO_DISCRIMINATOR_EVERY
    from mkd_tf.trainer import step_functions

    config = method_config(method, size, args, extra)
    warm_start = config["method"] == "mkd"  # MKD and its variants: a warm-start step and a distillation step
    batch_size = int(config["data"]["batch_size"])
    strategy = tf.distribute.get_strategy()
    started = time.perf_counter()
    model = build_model(config, strategy, size)
    build_seconds = time.perf_counter() - started
    pretrain_step, train_step = step_functions(strategy, model)
    batch = tf.nest.map_structure(tf.constant, synthetic_batch(batch_size, size))
    specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), batch)
    rows = []
    for phase, step in phases(model, pretrain_step, train_step):
        started = time.perf_counter()
        graph = step.get_concrete_function(specs, tf.TensorSpec((), tf.float32)).graph
        trace_seconds = time.perf_counter() - started
        row = {
            "size": size,
            "networks": network_choice(size, args.config)[1],
            "method": label or method,
            "phase": phase,
            "batch": batch_size,
            "segmentor": config["segmentor"],
            "alignment": config["alignment"] if warm_start else None,
            "build_seconds": build_seconds,
            "trace_seconds": trace_seconds,
            **summarise_flops(graph_flops(graph), profiler_flops(graph)),
        }
        if warm_start:
            every = config["alignment"]["discriminator_every"] or AUTO_DISCRIMINATOR_EVERY  # one device here
            row.update(breakdown_summary(graph, int(every)))
            row["mkd_pretrain"] = float(config["schedule"]["mkd_pretrain"])
        else:
            row["executed_flops"] = sum(scoped_flops(graph).values())
        if args.steps:
            row["rss_before_mb"] = reset_peak_rss()
            row["seconds"] = time_steps(step, batch, args.steps, args.warmup)
            row["peak_rss_mb"] = peak_rss_mb()
            row["median_seconds"] = float(np.median(row["seconds"]))
            row["spread"] = (max(row["seconds"]) - min(row["seconds"])) / row["median_seconds"]
            row["gflops_per_second"] = row["flops"] / row["median_seconds"] / 1e9
            row["loadavg"] = os.getloadavg()
        rows.append(row)
        print(
            f"  {size}x{size} {row['method']} ({phase}): {row['flops'] / 1e9:.2f} GFLOP/step"
            + (f" (executed {row['executed_flops'] / 1e9:.2f})" if "executed_flops" in row else "")
            + (
                f", {row['median_seconds']:.3f} s/step, {row['gflops_per_second']:.1f} GFLOP/s, "
                f"peak RSS {row['peak_rss_mb']:.0f} MiB"
                if args.steps
                else ""
            ),
            flush=True,
        )
    del model, pretrain_step, train_step
    keras.backend.clear_session()
    gc.collect()
    average = run_average(rows)
    if average:
        rows.append(average)
        print(
            f"  {size}x{size} {average['method']} (run average): {average['flops'] / 1e9:.2f} GFLOP/step"
            + (f" (executed {average['executed_flops'] / 1e9:.2f})" if "executed_flops" in average else "")
            + (f", {average['median_seconds']:.3f} s/step" if "median_seconds" in average else ""),
            flush=True,
        )
    return config, rows


def run_average(rows):
    """The FLOPs per step of a whole run of a method with a warm start: its two steps weighted by their
    shares of the run (``schedule.mkd_pretrain`` of the steps warm start, the rest ``train``); None
    without a warm start row."""
    by_phase = {row["phase"]: row for row in rows}
    if "warm start" not in by_phase or "train" not in by_phase:
        return None
    warm, train = by_phase["warm start"], by_phase["train"]
    share = train.get("mkd_pretrain", 0.7)
    weights = ((warm, share), (train, 1.0 - share))

    def mean(key):
        return sum(row[key] * weight for row, weight in weights)

    flops = mean("flops")
    average = {
        key: train[key] for key in ("size", "networks", "method", "batch", "segmentor", "alignment", "mkd_pretrain")
    }
    average.update(
        phase="run average",
        flops=flops,
        profiler_flops=mean("profiler_flops"),
        control_flow={},
        **{
            key: sum(row[key] * row["flops"] * weight for row, weight in weights) / flops
            for key in ("conv_share", "backward_share", "optimizer_share")
        },
    )
    for key in ("executed_flops", "graph_flops_weighted", "median_seconds"):
        if key in train and key in warm:
            average[key] = mean(key)
    return average


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fmt(value, digits=2, scale=1.0):
    return "-" if value is None else f"{value / scale:.{digits}f}"


def markdown(result):
    peak = result["conv_peak_gflops_per_second"]
    counts = result["conv_peaks"][0]
    hand = counts["hand_flops"]
    gradient_convs = sum(counts["conv_flops_forward_and_gradients"].values())
    lines = [
        "# Training cost per step",
        "",
        f"`{result['command']}`",
        "",
        f"{result['host']['cpus']} CPUs ({result['host']['processor'] or 'unknown'}), TensorFlow "
        f"{result['host']['tensorflow']}, Keras {result['host']['keras']}, float32, no XLA; load average "
        f"{result['host']['loadavg_start'][0]:.2f} at the start, {result['host']['loadavg_end'][0]:.2f} at "
        f"the end (other processes on the CPU slow every timing). "
        + (
            f"{result['steps']} timed steps after {result['warmup']} warm-up; s/step is their median."
            if result["steps"]
            else "FLOPs only (--steps 0)."
        ),
        "",
        f"Conv peak: {peak:.1f} GFLOP/s (fastest call at the start, at the end: "
        + ", ".join(f"{p['gflops_per_second']:.1f}" for p in result["conv_peaks"])
        + f"), `tf.nn.conv2d` {'x'.join(str(v) for v in PEAK_CONV[:4])} -> {PEAK_CONV[4]}, "
        f"{PEAK_CONV[5]}x{PEAK_CONV[5]}, {hand / 1e9:.2f} GFLOP by hand; the profiler counts "
        f"{counts['profiler_flops'] / 1e9:.2f} GFLOP for it "
        f"({'equal' if counts['profiler_flops'] == hand else 'DIFFERENT'}), and {gradient_convs / hand:.2f} x "
        "that in convolutions for forward + both gradients (Conv2DBackpropInput and Conv2DBackpropFilter "
        "are counted).",
        "",
        (
            "| size | networks | method | GFLOP/step | executed GFLOP | profiler GFLOP | conv % | bwd % | opt % | "
            "s/step | spread % | GFLOP/s | % peak | peak RSS MiB |"
        ),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        name = row["method"] + ("" if row["phase"] == "train" else f" ({row['phase']})")
        rate = row.get("gflops_per_second")
        lines.append(
            f"| {row['size']} | {row['networks']} | {name} | {fmt(row['flops'], 2, 1e9)} | "
            f"{fmt(row.get('executed_flops'), 2, 1e9)} | {fmt(row['profiler_flops'], 2, 1e9)} | {100 * row['conv_share']:.1f} | {100 * row['backward_share']:.1f} | "
            f"{100 * row['optimizer_share']:.1f} | {fmt(row.get('median_seconds'), 3)} | "
            f"{fmt(row['spread'] * 100 if 'spread' in row else None, 0)} | {fmt(rate, 1)} | "
            f"{fmt(rate / peak * 100 if rate else None, 0)} | {fmt(row.get('peak_rss_mb'), 0)} |"
        )
    lines += [
        "",
        "`GFLOP/step` counts every op of the traced step; `executed GFLOP` only those a call runs (gradients "
        "that no optimizer takes are pruned); a `(run average)` row weighs the warm-start and distillation "
        "steps by their shares of a run (`schedule.mkd_pretrain`), its s/step as well.",
    ]
    partial = sorted({r["method"] for r in result["rows"] if r["profiler_flops"] != r["flops"]})
    if partial:
        lines += [
            "",
            f"`profiler GFLOP` differs for {', '.join(partial)}: the step has nested functions ("
            + ", ".join(sorted({k for r in result["rows"] if r["method"] in partial for k in r["control_flow"]}))
            + ") whose ops the profiler does not see; `GFLOP/step` counts them.",
        ]
    checks = [r for r in result["rows"] if r.get("largest_conv")]
    if checks:
        c = checks[0]["largest_conv"]
        lines += [
            "",
            (
                f"Hand check in the step graph ({checks[0]['size']}x{checks[0]['size']} "
                f"{checks[0]['method']}): its costliest Conv2D `{c['op']}` {c['input']} * {c['kernel']} -> "
                f"{c['output']}: registry {c['flops']:,} FLOPs, hand {c['hand_flops']:,} "
                f"({'equal' if c['flops'] == c['hand_flops'] else 'DIFFERENT'})."
            ),
        ]
    if result["workers"]:
        counts = result["worker_counts"]
        lines += [
            "",
            (
                "Same step and global batch under MultiWorkerMirroredStrategy, N local processes "
                f"(127.0.0.1) sharing this machine's {result['host']['cpus']} CPUs (so N > 1 measures "
                "the multi-worker overhead on shared cores, not scaling over machines); intra-op "
                f"threads per worker: {result['worker_threads'] or 'TensorFlow default'}:"
            ),
            "",
            "| size | method | default steps/s | "
            + " | ".join(f"MWMS x{n} steps/s" for n in counts)
            + (" | MWMS x1 overhead s/step" if 1 in counts else "")
            + "".join(f" | speed-up x{n}" for n in counts if n > 1)
            + " |",
            "| --- | --- | ---: | "
            + " | ".join("---:" for _ in counts)
            + (" | ---:" if 1 in counts else "")
            + "".join(" | ---:" for n in counts if n > 1)
            + " |",
        ]
        for entry in result["workers"]:
            default = entry["default_median_seconds"]
            runs = {r["workers"]: r for r in entry["runs"]}
            cells = [fmt(1 / runs[n]["median_seconds"], 3) if "error" not in runs[n] else "failed" for n in counts]
            if 1 in counts:
                one = runs[1].get("median_seconds")
                cells.append(fmt(one - default if one is not None else None, 3))
            for n in counts:
                if n > 1:
                    value = runs[n].get("median_seconds")
                    cells.append(fmt(default / value if value else None, 2))
            lines.append(f"| {entry['size']} | {entry['method']} | {fmt(1 / default, 3)} | " + " | ".join(cells) + " |")
        errors = [
            f"{e['size']} {e['method']} x{r['workers']}: {r['error']}"
            for e in result["workers"]
            for r in e["runs"]
            if "error" in r
        ]
        if errors:
            lines += ["", "Failed worker runs:", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


# --- the breakdown report (--breakdown) -------------------------------------------------------------------


#: the generators' size (base_filters, num_blocks) of the earlier default MKD, by today's default size:
#: the phantom comparison's networks (benchmarks/compare_phantom.yaml) and the config defaults
EARLIER_GENERATORS = {8: (16, 3), 16: (32, 6)}


def _earlier_generators(config):
    base_filters, num_blocks = EARLIER_GENERATORS[config["alignment"]["base_filters"]]
    return {"alignment": {"base_filters": base_filters, "num_blocks": num_blocks}}


def _full_iam_with(**alignment):
    """The earlier default MKD (mkd-full-iam, generators twice today's size) with ``alignment`` changed."""

    def overrides(config):
        merged = _earlier_generators(config)
        merged["alignment"].update(alignment)
        return merged

    return overrides


#: label -> (method or variant, overrides or a function of the size's config returning them). The earlier
#: default (the paper's IAM training, larger generators) and each of its cheaper settings alone, then
#: today's default ("mkd", whose step is also broken down by part), which combines them.
CANDIDATES = {
    "earlier default (mkd-full-iam, generators 2x)": ("mkd-full-iam", _earlier_generators),
    "target cycle off": ("mkd-full-iam", _full_iam_with(target_cycle=False)),
    "discriminators every 2nd step": ("mkd-full-iam", _full_iam_with(discriminator_every=2)),
    "discriminators every 4th step": ("mkd-full-iam", _full_iam_with(discriminator_every=4)),
    "IAM frozen after the warm start": ("mkd-full-iam", _full_iam_with(freeze_after_warm_start=True)),
    "generators half size (mkd-full-iam)": ("mkd-full-iam", None),
    "the three IAM settings (generators 2x)": ("mkd", _earlier_generators),
    "mkd": ("mkd", None),
}


def measure_candidate(label, size, args):
    """Rows of one :data:`CANDIDATES` entry (a registered variant's overrides under the candidate's)."""
    name, extra = CANDIDATES[label]

    def overrides(base):
        return extra(base) if callable(extra) else (extra or {})

    return measure_method(name, size, args, label, overrides)[1]


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {os.getloadavg()}"


def git_commit():
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def breakdown_markdown(result):
    """The breakdown tables: per size, MKD's two steps by part, then every candidate's FLOPs per step."""
    g = 1e9
    lines = [
        "# Where MKD's training FLOPs go",
        "",
        (
            f"Date: {result['date']}; commit `{result['commit']}` (plus the working tree's changes, if any); command "
            f"`{result['command']}`; networks: 48x48 `benchmarks/compare_phantom.yaml` (the phantom comparison's), "
            f"256x256 the config defaults; batch {result['batch']} slices per stream, float32, no XLA; "
            f"{result['cpus']} CPUs; `uptime`: {result['uptime']}. FLOPs only (counted from the traced graph, "
            "nothing is timed, so the load does not change them)."
        ),
        "",
        (
            "Counting: TensorFlow's FLOP registry over the step's `tf.function` graph (the `GFLOP/step` of "
            "`training_cost.md`). **graph** counts every op the trace holds; **executed** counts only the ops a call "
            "runs: the ancestors of the step's outputs and of its stateful ops (the variable updates). The tape "
            "builds gradients nobody takes (e.g. S_syn's filter gradients in G's loss, the input gradients of "
            "networks on real images, the discriminators' loss back into the generators), which the `tf.function` "
            "prunes; the executed count is the work done. Parts are MKDModel's name scopes "
            "(`mkd_tf/models/mkd.py`); a part's backward is the gradient ops of its forward ops (the tape names "
            "them after them), summed over the three losses that reach it; `discriminator_every` = k counts the "
            "discriminators' update (its `tf.cond` branch) 1/k of the steps. Run average: "
            f"{result['mkd_pretrain']:.0%} warm-start steps (`schedule.mkd_pretrain`), the rest distillation."
        ),
    ]
    rows = result["rows"]

    def find(size, method, phase):
        return next(r for r in rows if r["size"] == size and r["method"] == method and r["phase"] == phase)

    def graph(row):
        """The graph count, with ``discriminator_every``'s update counted 1/k of the steps as executed is."""
        if "graph_flops_weighted" in row or row["phase"] != "run average":
            return row.get("graph_flops_weighted", row["flops"])
        share = row["mkd_pretrain"]
        return share * graph(find(row["size"], row["method"], "warm start")) + (1 - share) * graph(
            find(row["size"], row["method"], "train")
        )

    for size in result["sizes"]:
        steps = {"train": find(size, "mkd", "train"), "warm start": find(size, "mkd", "warm start")}
        parts = [p for p in MKD_PARTS if any(p in r["parts"] for r in steps.values())]
        parts += [f"{o} update" for o in OPTIMIZERS if any(f"{o} update" in r["parts"] for r in steps.values())]
        lines += [
            "",
            f"## {size}x{size} ({steps['train']['networks']} networks): one MKD step by part, executed GFLOP",
            "",
            "| part | distillation fwd | bwd | total | % | warm start fwd | bwd | total | % |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for part in parts:
            cells = []
            for row in steps.values():
                kinds = row["parts"].get(part, {})
                total = sum(kinds.values())
                forward = kinds.get("forward", 0) + kinds.get("update", 0)
                cells += (
                    [fmt(forward, 2, g), fmt(kinds.get("backward", 0), 2, g), fmt(total, 2, g)]
                    + [f"{100 * total / row['executed_flops']:.1f}"]
                    if kinds
                    else ["", "", "", ""]
                )
            lines.append(f"| {MKD_PARTS.get(part, part)} | " + " | ".join(cells) + " |")
        totals = []
        for row in steps.values():
            forward = sum(k.get("forward", 0) + k.get("update", 0) for k in row["parts"].values())
            backward = sum(k.get("backward", 0) for k in row["parts"].values())
            totals += [fmt(forward, 2, g), fmt(backward, 2, g), f"**{row['executed_flops'] / g:.2f}**", "100"]
        lines.append("| **executed, whole step** | " + " | ".join(totals) + " |")
        lines.append(
            "| graph (incl. pruned ops) | | | "
            + " | | | | ".join(f"{row['flops'] / g:.2f}" for row in steps.values())
            + " | |"
        )
    lines += [
        "",
        "## Candidates: GFLOP per step (executed; graph count in brackets) and the run average's ratio to joint's",
        "",
        (
            "Joint's step (one segmentor on the assistant and the labelled target, 2 x batch slices) is its "
            "run average (one phase)."
        ),
        "",
        "| size | candidate | settings | distillation | warm start | run average | x joint (executed) | x joint (graph) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in result["sizes"]:
        joint = find(size, "joint", "train")
        lines.append(
            f"| {size} | joint | | {joint['executed_flops'] / g:.2f} ({joint['flops'] / g:.2f}) | | "
            f"{joint['executed_flops'] / g:.2f} ({joint['flops'] / g:.2f}) | 1.00 | 1.00 |"
        )
        for label in result["candidates"]:
            cells = [find(size, label, phase) for phase in ("train", "warm start", "run average")]
            lines.append(
                f"| {size} | {label} | `{result['candidate_settings'][str(size)][label]}` | "
                + " | ".join(f"{c['executed_flops'] / g:.2f} ({graph(c) / g:.2f})" for c in cells)
                + f" | {cells[2]['executed_flops'] / joint['executed_flops']:.2f} | "
                f"{graph(cells[2]) / joint['flops']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def breakdown_main(args):
    """``--breakdown``: joint and every :data:`CANDIDATES` entry at every size, FLOPs only."""
    import datetime

    started_load = os.getloadavg()
    from mkd_tf.config import load_config

    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "uptime": uptime(),
        "cpus": os.cpu_count(),
        "sizes": args.size,
        "candidates": args.candidates,
        "candidate_settings": {},
        "rows": [],
    }
    for size in args.size:
        result["rows"] += measure_method("joint", size, args)[1]
        settings = result["candidate_settings"][str(size)] = {}
        for label in args.candidates:
            rows = measure_candidate(label, size, args)
            result["rows"] += rows
            name, extra = CANDIDATES[label]
            base = load_config(network_choice(size, args.config)[0], {"method": "mkd"})
            from mkd_tf import registry

            shown = {section: dict(values) for section, values in registry.variant_overrides(name).items()}
            for section, values in (extra(base) if callable(extra) else (extra or {})).items():
                shown.setdefault(section, {}).update(values)
            settings[label] = (
                ", ".join(
                    f"{section}.{key}={value}" for section, values in shown.items() for key, value in values.items()
                )
                or "defaults"
            )
            if label == "mkd":
                result["mkd_pretrain"] = rows[0]["mkd_pretrain"]
                result["batch"] = rows[0]["batch"]
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    write_result(out, result, breakdown_markdown(result), record_header(args, started_load))


def record_header(args, started_load):
    """The standard record header (benchmarks/README.md): date, commit, command, config, machine."""
    import datetime

    sizes = ", ".join(f"{size}x{size}: {network_choice(size, args.config)[1]} networks" for size in args.size)
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": "python benchmarks/training_cost.py " + " ".join(sys.argv[1:]),
        "config": f"{sizes} (phantom: benchmarks/compare_phantom.yaml; defaults: the config defaults); float32, no XLA",
        "machine": f"{os.cpu_count()} cores ({cpu_model() or 'unknown'}); load average {started_load[0]:.2f} at the "
        f"start, {os.getloadavg()[0]:.2f} at the end",
    }


def write_result(out, result, table, header, suffix=""):
    """Write ``result`` to OUT.json and its ``table`` to OUT.md, both under the standard ``header``; print the
    table and where both went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"header": header, **result}, indent=1, default=str))
    lines = ["<!-- record header -->", *(f"- {key}: {value}" for key, value in header.items()), "", table]
    out.with_suffix(".md").write_text("\n".join(lines))
    print()
    print(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}{suffix}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="+", default=[48, 256], help="slice sizes (square)")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), help="registered methods or variants [the six methods]"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (0: FLOPs only)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (tracing excluded)")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=[1, 2],
        help="MultiWorkerMirroredStrategy worker counts to time (none: skip)",
    )
    parser.add_argument("--worker-threads", type=int, default=0, help="intra-op threads per worker (0: TF default)")
    parser.add_argument("--worker-timeout", type=float, default=10800.0, help="seconds one worker run may take")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per stream [config's: 8]")
    parser.add_argument(
        "--config", default=None, help="YAML for every size [<=64: compare_phantom.yaml, else defaults]"
    )
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "training_cost"),
        help="output path without suffix: writes OUT.json and OUT.md",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="FLOPs only: MKD's steps by part and every candidate (--candidates) against joint; --out defaults to "
        "benchmarks/results/training_cost_breakdown",
    )
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)  # internal: run as one worker
    args = parser.parse_args()
    if args.worker_spec:
        return worker_main(json.loads(args.worker_spec))
    if args.breakdown:
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
        if args.out == parser.get_default("out"):
            args.out = str(ROOT / "benchmarks" / "results" / "training_cost_breakdown")
        if "mkd" not in args.candidates:
            args.candidates.insert(0, "mkd")
        args.steps = 0
        return breakdown_main(args)
    if any(count < 1 for count in args.workers) or args.steps < 0 or args.warmup < 0:
        parser.error("--workers counts must be >= 1, --steps and --warmup >= 0")

    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # the FLOP registry's deprecation warnings
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    started = time.perf_counter()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "steps": args.steps,
        "warmup": args.warmup,
        "worker_threads": args.worker_threads,
        "worker_counts": sorted(set(args.workers)) if args.steps else [],
        "host": {
            "cpus": os.cpu_count(),
            "processor": cpu_model(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "conv_peaks": [],
        "rows": [],
        "workers": [],
    }
    print(f"conv peak ({'x'.join(map(str, PEAK_CONV))})...", flush=True)
    result["conv_peaks"].append(conv_peak(args.peak_repeats))
    print(f"  {result['conv_peaks'][-1]['gflops_per_second']:.1f} GFLOP/s", flush=True)
    for size in args.size:
        for method in args.methods:
            config, rows = measure_method(method, size, args)
            result["rows"].extend(rows)
            if not (args.steps and result["worker_counts"]):
                continue
            entry = {
                "size": size,
                "method": method,
                "phase": "train",
                "default_median_seconds": rows[0]["median_seconds"],
                "runs": [],
            }
            for count in result["worker_counts"]:
                if int(config["data"]["batch_size"]) % count:
                    entry["runs"].append({"workers": count, "error": "batch not divisible by the worker count"})
                    continue
                spec = {
                    "config": config,
                    "size": size,
                    "phase": "train",
                    "batch": int(config["data"]["batch_size"]),
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "threads": args.worker_threads,
                    "timeout": min(args.worker_timeout, 600.0),
                }
                run = run_workers(count, spec, args.worker_timeout)
                entry["runs"].append(run)
                print(
                    f"  {size}x{size} {method}, {count} worker(s): "
                    + (f"{run['median_seconds']:.3f} s/step" if "error" not in run else run["error"]),
                    flush=True,
                )
            result["workers"].append(entry)
    result["conv_peaks"].append(conv_peak(args.peak_repeats))
    result["conv_peak_gflops_per_second"] = max(p["gflops_per_second"] for p in result["conv_peaks"])
    result["host"]["loadavg_end"] = os.getloadavg()
    result["wall_seconds"] = time.perf_counter() - started
    header = record_header(args, result["host"]["loadavg_start"])
    write_result(out, result, markdown(result), header, f" ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
