"""mkd-tf: cross-modality segmentation with online Mutual Knowledge Distillation (TF2 / Keras 3).

The Python API is the library the `mkd` command line calls, one function per command::

    from mkd_tf import prepare, train, evaluate, predict, export, convert_tflite

    prepare("phantom/", "phantom/", "cache/", {"target_labelled": 1, "preprocess": {"size": 48}})
    result = train("cache/", "runs/mkd", overrides={"schedule": {"epochs": 2}})
    metrics = evaluate("runs/mkd")

See docs/python-api.md for a complete example. ``import mkd_tf`` is cheap: each function's module (and
with it TensorFlow, for train/evaluate/predict/export) is imported on first use, by :func:`__getattr__`.
"""

import importlib

__version__ = "0.1.0"

#: The public API: name -> ``"module:attribute"`` defining it (``mkd_tf.export`` is the package itself,
#: which is callable: it is :func:`mkd_tf.export.serving.export_run`).
API = {
    "prepare": "mkd_tf.data.prepare:prepare_cache",
    "train": "mkd_tf.training:train",
    "evaluate": "mkd_tf.evaluation:evaluate_run",
    "predict": "mkd_tf.inference:predict",
    "export": "mkd_tf.export",
    "convert_tflite": "mkd_tf.export.tflite:convert_to_tflite",
    "PrepareOptions": "mkd_tf.data.prepare:PrepareOptions",
    "PreprocessConfig": "mkd_tf.data.preprocess:PreprocessConfig",
    "Prediction": "mkd_tf.inference:Prediction",
    "SliceCache": "mkd_tf.data.cache:SliceCache",
    "write_phantom": "mkd_tf.data.phantom:write_phantom",
}

__all__ = [
    "__version__",
    "prepare",
    "train",
    "evaluate",
    "predict",
    "export",
    "convert_tflite",
    "PrepareOptions",
    "PreprocessConfig",
    "Prediction",
    "SliceCache",
    "write_phantom",
]

# Function-level imports of mkd_tf's own modules are allowed only where listed here, each with why
# (tests/test_style.py fails on any other). They keep the CLI's start-up (`mkd --help`, `mkd CMD --help`,
# an option error) at the import of click, the config and the registry: `python -X importtime -c "import
# mkd_cli.main"` 0.25 s on 2 shared cores (load 16); with these imports at the top of the CLI modules 1.8 s
# (numpy 0.29 s, scipy.ndimage 1.0 s, nibabel 0.53 s), and `import tensorflow` alone is 12 s there (3-13 s).
LAZY_IMPORTS = {
    # PEP 562: the public API above, so that `import mkd_tf` imports neither TensorFlow nor numpy.
    "mkd_tf/__init__.py": {"__getattr__": "the public API, loaded on first use (importlib)"},
    # Commands that train or load a model: their modules import TensorFlow (12 s).
    "cli/method_commands.py": {
        "train": "mkd_tf.training imports TensorFlow",
        "evaluate": "mkd_tf.evaluation imports TensorFlow (through mkd_tf.inference)",
        "predict": "mkd_tf.inference imports TensorFlow; mkd_tf.export.client and .prediction_files numpy, "
        "nibabel (0.51 s)",
        "_predict_folder": "mkd_tf.inference imports TensorFlow (predict's folder mode)",
        "compare": "mkd_tf.compare imports TensorFlow (through mkd_tf.training)",
        "demo": "mkd_tf.demo imports TensorFlow (through mkd_tf.training)",
    },
    # The data commands never import TensorFlow, but mkd_tf.data.* import numpy, scipy and nibabel
    # (mkd_tf.data.prepare 0.79 s), which `mkd --help` and option errors do not need.
    "cli/data_commands.py": {
        "phantom": "mkd_tf.data.phantoms: numpy (0.29 s)",
        "prepare": "mkd_tf.data.prepare: numpy, scipy, nibabel (0.79 s)",
        "info": "mkd_tf.data.prepare: numpy, scipy, nibabel (0.79 s)",
    },
    "cli/export_commands.py": {
        "export": "mkd_tf.export.serving: numpy, nibabel; TensorFlow when it runs",
        "tflite": "mkd_tf.export.tflite: numpy, scipy (0.63 s); TensorFlow when it runs",
    },
    # The package is the public API's `export` (callable) and holds the constants `mkd tflite --help`
    # shows; mkd_tf.export.serving would add numpy and nibabel to every CLI start-up.
    "mkd_tf/export/__init__.py": {"__wrapped__": "mkd_tf.export.serving: numpy, nibabel"},
    # export_run needs a trained model: mkd_tf.inference imports TensorFlow, which mkd_tf.export.client
    # (`mkd predict --server`, reads read_model_asset from this module) must not pay.
    "mkd_tf/export/serving.py": {"export_run": "mkd_tf.inference imports TensorFlow"},
    # A real cycle: mkd_tf.data.phantom and .phantoms.abdomen import mkd_tf.data.phantoms.common, whose
    # package (this __init__) runs first and would import them back half-initialised.
    "mkd_tf/data/phantoms/__init__.py": {"write_phantom_dataset": "import cycle through phantoms.common"},
}


def __getattr__(name):
    """PEP 562: import a public API name's module on first access (``mkd_tf.train`` -> mkd_tf.training)."""
    if name not in API:
        raise AttributeError(f"module 'mkd_tf' has no attribute {name!r}")
    module, _, attribute = API[name].partition(":")
    value = importlib.import_module(module)
    if attribute:
        value = getattr(value, attribute)
        globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *API])
