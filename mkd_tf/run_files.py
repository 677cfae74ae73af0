"""The schemas and readers of a run folder's JSON files: ``cache.json`` and ``history.json``.

Kept apart from :mod:`mkd_tf.run_folder` (which writes them, and imports TensorFlow) so that a
TensorFlow-free reader, such as the TF Serving client reading a run's ``cache.json``, validates them the
same way. Every reader goes through :func:`read_cache_record` / :func:`read_history`: a file that is
missing a key or holds one of the wrong type is one line naming the file and the key.
"""

from pathlib import Path

from mkd_tf import schema
from mkd_tf.data.cache import INTENSITY, LABEL_VALUES, PREPROCESS, check_intensity, check_label_values
from mkd_tf.files import read_json

_MODALITY = schema.mapping({"name": schema.text(), "label_values": LABEL_VALUES})
#: ``RUN/cache.json``: what predict, evaluate and export need of the cache a run was trained on
#: (:func:`mkd_tf.training.cache_record`)
CACHE_RECORD = {
    "path": schema.text(),
    "classes": schema.strings(min_length=2),
    "preprocess": schema.mapping(PREPROCESS),
    "target": _MODALITY,
    "assistant": _MODALITY,
    "target_intensity": schema.mapping({"kind": schema.text(choices=tuple(INTENSITY))}),
}

_DICE = schema.mapping(values=schema.numbers(), nullable=True)  # predictor -> Dice per structure
#: ``RUN/history.json``: one record per finished epoch and the best one so far
HISTORY = {
    "epochs": schema.listing(
        schema.mapping(
            {
                "epoch": schema.integer(1),
                "losses": schema.mapping(values=schema.number()),
                "steps_per_second": schema.number(low=0),
                "val_dice": _DICE,
                "test_dice": schema.mapping(values=schema.numbers(), nullable=True, required=False),  # added later
                "val_dice_mean": schema.number(required=False),  # only with validation data
            }
        )
    ),
    "best": schema.mapping(
        {"epoch": schema.integer(1), "score": schema.number(), "predictor": schema.text()}, nullable=True
    ),
}


def read_cache_record(run, missing="missing: the run folder is incomplete"):
    """``RUN/cache.json``, checked against :data:`CACHE_RECORD` (label values name the classes).

    Args:
        run: the run folder.
        missing: the problem to report when the file does not exist.

    Returns:
        The record (a dict).
    """
    path = Path(run) / "cache.json"
    record = read_json(path, missing)
    schema.validate(path, record, CACHE_RECORD)
    for role in ("target", "assistant"):
        check_label_values(path, record["classes"], record[role]["label_values"], f"{role}.label_values")
    check_intensity(path, record["target_intensity"], "target_intensity")
    return record


def read_history(path):
    """A run's ``history.json``, checked against :data:`HISTORY`.

    Returns:
        The history (a dict with ``epochs`` and ``best``).
    """
    path = Path(path)
    history = read_json(path)
    schema.validate(path, history, HISTORY)
    return history
