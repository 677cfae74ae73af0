"""Doctests of mkd_tf (``make test`` collects them with ``--doctest-modules``).

Each doctest runs in a fresh temporary folder (examples that write files write there). The examples of
the slice cache and the data pipeline read ``SliceCache("cache")``: for those, ``cache`` in that folder
is a tiny slice cache (2 CT + 2 MRI phantom volumes, 32x32 slices), made once per session.
"""

import os

import pytest

from mkd_tf.data.phantom import write_phantom
from mkd_tf.data.prepare import PrepareOptions, prepare_cache
from mkd_tf.data.preprocess import PreprocessConfig

#: doctests whose examples read the tiny cache
NEEDS_CACHE = ("mkd_tf.data.cache.SliceCache", "mkd_tf.data.pipeline.slice_dataset")


@pytest.fixture(scope="session")
def doctest_cache(tmp_path_factory):
    root = write_phantom(tmp_path_factory.mktemp("doctest") / "phantom", n_ct=2, n_mr=2, shape=(48, 48, 24))
    options = PrepareOptions(
        split=(1.0, 0.0, 0.0), allow_crop=True, preprocess=PreprocessConfig(size=32, spacing=(4.0, 4.0, 4.0))
    )
    return prepare_cache(root / "ct_train", root / "mr_train", root.parent / "cache", options)


@pytest.fixture(autouse=True)
def _doctest_folder(request, tmp_path):
    """Run every doctest in its own temporary folder, with ``cache`` there when its example needs one."""
    if type(request.node).__name__ != "DoctestItem":
        yield
        return
    if request.node.name in NEEDS_CACHE:
        (tmp_path / "cache").symlink_to(request.getfixturevalue("doctest_cache"))
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield
    finally:
        os.chdir(previous)
