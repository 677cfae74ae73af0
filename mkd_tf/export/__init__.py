"""Deployment: TF Serving SavedModels (:mod:`.serving`, :mod:`.client`) and TFLite (:mod:`.tflite`).

The TFLite modes and their parity gates live here, free of TensorFlow and numpy, so `mkd tflite --help`
states the values the code uses without importing the converter.

The package is callable: ``mkd_tf.export(run_dir, out, ...)`` is :func:`mkd_tf.export.serving.export_run`
(the public API's ``export``, see :mod:`mkd_tf`).
"""

import sys
import types

#: `mkd tflite --quantize` modes (see :mod:`mkd_tf.export.tflite`)
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
# Measured (`benchmarks/tflite_agreement.py --seeds 8`: 8 small target-only U-Nets, 16 test slices each):
# none 1.0000 on all 8; float16 0.9982-1.0000; dynamic 0.9809-0.9951; int8 0.7781-0.9815 (mean 0.935:
# near-ties of an under-trained model flip at int8's 1/256 probability step). Each gate sits below the
# lowest value measured, so a sound conversion passes and a broken one (wrong calibration, a wrong op)
# does not; the parity line always reports the agreement itself.
DEFAULT_MIN_AGREEMENT = {"none": 0.999, "float16": 0.995, "dynamic": 0.975, "int8": 0.75}


class _CallablePackage(types.ModuleType):
    """``mkd_tf.export(...)`` is :func:`mkd_tf.export.serving.export_run`.

    The public API's ``export`` function has the name of this package, and importing any of its modules
    (``mkd_tf.export.tflite``) binds ``mkd_tf.export`` to the package, so the package itself is the function.
    """

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)

    @property
    def __wrapped__(self):  # inspect.signature(mkd_tf.export) is export_run's
        from mkd_tf.export.serving import export_run

        return export_run


sys.modules[__name__].__class__ = _CallablePackage
