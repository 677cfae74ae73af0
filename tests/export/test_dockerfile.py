"""The Dockerfile's two targets are consistent with the repository and with `mkd export` (no Docker needed)."""

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest

from mkd_tf.export.serving import DEFAULT_SERVING_ROOT, MODELS_CONFIG

ROOT = Path(__file__).resolve().parents[2]
#: COPY sources that `mkd export` produces (the folder itself is in the repo with a README.md)
PRODUCED_BY_EXPORT = {"saved_models/"}


def _instructions():
    """`(stage name, instruction, argument text)` for every instruction, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    result, stage = [], None
    for line in logical:
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", argument, flags=re.IGNORECASE)
            assert match, f"every FROM names its stage: {line}"
            stage = match[2]
            result.append((stage, keyword, match[1]))
        else:
            result.append((stage, keyword, argument))
    return result


def _stage(name):
    return [(keyword, argument) for stage, keyword, argument in _instructions() if stage == name]


def test_stages_train_and_serving():
    stages = [stage for stage, keyword, _ in _instructions() if keyword == "FROM"]
    assert stages == ["train", "serving"]


@pytest.mark.parametrize("stage, image", [("train", "tensorflow/tensorflow"), ("serving", "tensorflow/serving")])
def test_base_images_are_official_and_pinned(stage, image):
    base = _stage(stage)[0][1]
    name, _, tag = base.partition(":")
    assert name == image
    # A release version (never `latest` or a floating major tag) or a digest.
    assert re.fullmatch(r"\d+\.\d+\.\d+(-gpu)?", tag) or "@sha256:" in base, base
    if stage == "train":
        from importlib.metadata import version

        assert tag.split("-")[0] == version("tensorflow"), "train image TensorFlow = the version the tests run with"


def _copy_sources():
    for stage, keyword, argument in _instructions():
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(argument) if not w.startswith("--")]
            assert len(words) >= 2, argument
            yield stage, words[:-1], words[-1]


def test_every_copy_source_exists_or_is_produced_by_export():
    for stage, sources, _ in _copy_sources():
        for source in sources:
            assert "*" not in source and ".." not in source, source
            assert (ROOT / source).exists(), f"{stage}: COPY {source} is missing from the repository"
            if (ROOT / source).is_dir():
                assert source.endswith("/"), f"copy folders with a trailing slash: {source}"
    produced = {source for stage, sources, _ in _copy_sources() for source in sources if stage == "serving"}
    assert produced == PRODUCED_BY_EXPORT


def test_train_image_installs_every_package_with_constraints():
    instructions = _stage("train")
    copied = {source.rstrip("/") for stage, sources, _ in _copy_sources() if stage == "train" for source in sources}
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    package_dirs = dict(line.split(" = ") for line in config["options"]["package_dir"].strip().splitlines())
    for package in config["options"]["packages"].split():
        top = package.split(".")[0]
        folder = package_dirs.get(top, top)
        assert folder in copied, f"package {package} lives in {folder}/, which the train stage does not copy"
    assert {"setup.cfg", "pyproject.toml", "constraints.txt"} <= copied
    runs = " ".join(argument for keyword, argument in instructions if keyword == "RUN")
    assert re.search(r"pip install .*-c constraints\.txt .*\.", runs)
    entrypoint = [argument for keyword, argument in instructions if keyword == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoint] == [["mkd"]]
    assert "mkd = mkd_cli.main:main" in config["options.entry_points"]["console_scripts"]


def test_serving_image_reads_the_config_mkd_export_writes():
    instructions = _stage("serving")
    copies = [(sources, target) for stage, sources, target in _copy_sources() if stage == "serving"]
    assert copies == [(["saved_models/"], f"{DEFAULT_SERVING_ROOT}/")]
    command = [json.loads(argument) for keyword, argument in instructions if keyword == "CMD"]
    assert len(command) == 1
    assert f"--model_config_file={DEFAULT_SERVING_ROOT}/{MODELS_CONFIG}" in command[0]
    # models.config may carry version_labels (`mkd export --label`); TF Serving refuses them at start
    # (the versions are not loaded yet) unless told otherwise.
    assert "--allow_version_labels_for_unavailable_models=true" in command[0]
    assert not [keyword for keyword, _ in instructions if keyword == "ENTRYPOINT"], "keep TF Serving's entrypoint"
