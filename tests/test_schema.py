"""Every file the project reads is checked on load against its declared schema.

For each kind of file (slice-cache manifest, a run's cache.json, config.yaml and history.json, nnU-Net
dataset.json, TF Serving models.config) the parametrised tests delete each required key and give each key a
value of the wrong type, and expect one line naming the file and the key. They call each file's loader
directly (the base files are built once per module); a few CLI tests prove that the commands go through
those loaders: exit status 2, one ``error:`` line, no traceback, nothing written.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf import schema
from mkd_tf.config import ADDED_SINCE, DEFAULTED_SINCE, RULES, load_config, save_config
from mkd_tf.data import cache as cache_module
from mkd_tf.data.cache import MANIFEST, SliceCache
from mkd_tf.data.layouts import DATASET_JSON, check_dataset_json
from mkd_tf.errors import MkdError
from mkd_tf.run_files import CACHE_RECORD, HISTORY, read_cache_record, read_history
from mkd_tf.rules import Rule
from tests.conftest import NNUNET_TARGET_LABELS
from tests.scripts import tiny_runs

# --- the mechanism ---------------------------------------------------------------------------------------


def test_validate_names_the_file_and_the_nested_key():
    spec = {
        "size": schema.integer(1),
        "classes": schema.strings(min_length=2),
        "modalities": schema.mapping({"target": schema.mapping({"values": schema.mapping(values=schema.integer(0))})}),
        "note": schema.text(required=False),
    }
    good = {"size": 32, "classes": ["background", "heart"], "modalities": {"target": {"values": {"heart": 1}}}}
    schema.validate("m.json", good, spec)

    def problem(data):
        with pytest.raises(MkdError) as info:
            schema.validate("m.json", data, spec)
        return str(info.value)

    assert problem({**good, "classes": 3}) == "m.json: key 'classes' must be a list of strings, got int"
    assert problem({**good, "classes": ["background", 3]}) == "m.json: key 'classes[1]' must be a string, got int"
    assert problem({**good, "classes": ["background"]}) == "m.json: key 'classes' must hold at least 2 values"
    assert problem({**good, "size": 0}) == "m.json: key 'size' must be in [1, inf], got 0"
    assert problem({**good, "size": True}) == "m.json: key 'size' must be a whole number, got bool"
    assert problem({**good, "size": 2.5}) == "m.json: key 'size' must be a whole number, got 2.5"
    assert problem({**good, "note": None}) == "m.json: key 'note' must be a string, got null"
    assert problem({**good, "modalities": {"target": {"values": {"heart": -1}}}}) == (
        "m.json: key 'modalities.target.values.heart' must be in [0, inf], got -1"
    )
    del good["size"]
    assert problem(good) == "m.json: key 'size' is missing"
    assert problem([1, 2]) == "m.json: must hold a mapping of keys, got list"


def test_a_number_must_be_finite():
    with pytest.raises(MkdError, match=r"key 'x' must be a number, got nan"):
        schema.validate("f", {"x": float("nan")}, {"x": schema.number()})


# --- the cases: every required key deleted, every key of the wrong type -----------------------------------

_WRONG = {"str": 5, "int": "5", "number": "x", "bool": "yes", "list": 5, "mapping": [1]}


def _cases(spec_tree, prefix=()):
    """``(action, path)`` for every key of a schema: ``("delete", path)`` when required, ``("retype", path)``
    always; ``0`` in a path is a list's first element, ``"*"`` a free-key mapping's first key."""
    for name, spec in spec_tree.items():
        path = (*prefix, name)
        if spec.required:
            yield "delete", path
        if spec.kind != "any":
            yield "retype", path
        inner = spec.items if spec.kind == "list" else spec.values if spec.kind == "mapping" else None
        if spec.kind == "mapping" and spec.keys:
            yield from _cases(spec.keys, path)
        elif inner is not None:
            index = 0 if spec.kind == "list" else "*"
            if inner.kind != "any":
                yield "retype", (*path, index)
            if inner.kind == "mapping" and inner.keys:
                yield from _cases(inner.keys, (*path, index))
            elif inner.kind in ("list", "mapping") and (inner.items or inner.values) is not None:
                yield "retype", (*path, index, 0 if inner.kind == "list" else "*")


def _resolve(data, path):
    """``path`` with ``"*"`` replaced by the first key there, and the parent holding its last element."""
    concrete, parent = [], None
    for part in path:
        if part == "*":
            assert isinstance(data, dict) and data, f"{concrete}: nothing to pick a key from"
            part = next(iter(data))
        parent = data
        concrete.append(part)
        data = data[part]
    return concrete, parent


def _dotted(path):
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _mutated(base, action, path):
    """A copy of ``base`` with the key at ``path`` deleted or of the wrong type; `(data, dotted key)`."""
    data = copy.deepcopy(base)
    concrete, parent = _resolve(data, path)
    last = concrete[-1]
    if action == "delete":
        del parent[last]
    else:
        parent[last] = _WRONG[_SPEC_AT[path]]
    return data, _dotted(concrete)


_SPEC_AT = {}  # path -> the kind of value its spec wants


def _index(tree, prefix=()):
    """Remember every path's spec kind (``_mutated`` needs it)."""
    for name, spec in tree.items():
        path = (*prefix, name)
        _SPEC_AT[path] = spec.kind
        inner = spec.items if spec.kind == "list" else spec.values if spec.kind == "mapping" else None
        if spec.kind == "mapping" and spec.keys:
            _index(spec.keys, path)
        elif inner is not None:
            index = 0 if spec.kind == "list" else "*"
            _SPEC_AT[(*path, index)] = inner.kind
            if inner.kind == "mapping" and inner.keys:
                _index(inner.keys, (*path, index))
            elif inner.kind in ("list", "mapping"):
                deeper = inner.items if inner.kind == "list" else inner.values
                if deeper is not None:
                    _SPEC_AT[(*path, index, 0 if inner.kind == "list" else "*")] = deeper.kind


for _tree in (MANIFEST, CACHE_RECORD, HISTORY, DATASET_JSON):
    _index(_tree)


def _ids(cases):
    return [f"{action}-{_dotted(path)}" for action, path in cases]


MANIFEST_CASES = list(_cases(MANIFEST))
CACHE_RECORD_CASES = list(_cases(CACHE_RECORD))
HISTORY_CASES = list(_cases(HISTORY))
DATASET_CASES = [case for case in _cases(DATASET_JSON) if case[1][0] != "modality"]  # v1's name, not in v2 files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`(phantom, cache)` of the tiny phantom (tests/scripts/tiny_runs.py), shared with the method tests."""
    return tiny_runs.tiny_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(tiny):
    return json.loads((Path(tiny[1]) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def record(tiny):
    from mkd_tf.training import cache_record

    return cache_record(SliceCache(tiny[1], verify=False))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny target-only run (one epoch of two steps), shared with the method tests. Read-only."""
    return tiny_runs.shared_run(tmp_path_factory, "target-only").path


def _problem(load):
    with pytest.raises(MkdError) as info:
        load()
    return str(info.value)


def _expect(message, path, key, action, noun="key"):
    expected = f"{path}: {noun} '{key}' " + ("is missing" if action == "delete" else "must be")
    assert message.startswith(expected), message


@pytest.mark.parametrize("action, path", MANIFEST_CASES, ids=_ids(MANIFEST_CASES))
def test_manifest(manifest, tmp_path, action, path):
    data, key = _mutated(manifest, action, path)
    where = tmp_path / "manifest.json"
    _expect(_problem(lambda: cache_module.check_manifest(where, data)), where, key, action)


@pytest.mark.parametrize("action, path", CACHE_RECORD_CASES, ids=_ids(CACHE_RECORD_CASES))
def test_run_cache_json(record, tmp_path, action, path):
    data, key = _mutated(record, action, path)
    (tmp_path / "cache.json").write_text(json.dumps(data))
    _expect(_problem(lambda: read_cache_record(tmp_path)), tmp_path / "cache.json", key, action)


@pytest.fixture(scope="module")
def history(run):
    values = json.loads((Path(run) / "history.json").read_text())
    assert values["epochs"][0]["val_dice_mean"] is not None and values["epochs"][0]["test_dice"]
    return values


@pytest.mark.parametrize("action, path", HISTORY_CASES, ids=_ids(HISTORY_CASES))
def test_history_json(history, tmp_path, action, path):
    data, key = _mutated(history, action, path)
    where = tmp_path / "history.json"
    where.write_text(json.dumps(data))
    _expect(_problem(lambda: read_history(where)), where, key, action)


DATASET = {
    "channel_names": {"0": "CT"},
    "labels": NNUNET_TARGET_LABELS,
    "numTraining": 3,
    "file_ending": ".nii.gz",
}


@pytest.mark.parametrize("action, path", DATASET_CASES, ids=_ids(DATASET_CASES))
def test_dataset_json(tmp_path, action, path):
    data, key = _mutated(DATASET, action, path)
    where = tmp_path / "dataset.json"
    _expect(_problem(lambda: check_dataset_json(where, data)), where, key, action)


def _config_cases():
    """Every setting a run's config.yaml must hold deleted, and every setting of the wrong type."""
    for key, rule in RULES.items():
        if isinstance(rule, dict):
            yield "delete", (key,)
            yield "retype", (key,)
            for name in rule:
                if (key, name) not in ADDED_SINCE and (key, name) not in DEFAULTED_SINCE:
                    yield "delete", (key, name)
                yield "retype", (key, name)
        else:
            if (None, key) not in DEFAULTED_SINCE:
                yield "delete", (key,)
            yield "retype", (key,)
    yield "delete", ("segmentor", "base_filters")  # the architecture's own settings are recorded too
    yield "retype", ("segmentor", "base_filters")


CONFIG_CASES = list(_config_cases())


@pytest.fixture(scope="module")
def recorded_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    save_config(load_config(), path)
    return yaml.safe_load(path.read_text())


def _wrong_setting(path):
    rule = RULES
    for part in path:
        rule = rule.get(part, Rule("int")) if isinstance(rule, dict) else rule
    if isinstance(rule, dict):
        return 5
    return 5 if rule.kind == "choice" else "five"


@pytest.mark.parametrize("action, path", CONFIG_CASES, ids=_ids(CONFIG_CASES))
def test_run_config_yaml(recorded_config, tmp_path, action, path):
    data = copy.deepcopy(recorded_config)
    parent = data if len(path) == 1 else data[path[0]]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = _wrong_setting(path)
    where = tmp_path / "config.yaml"
    where.write_text(yaml.safe_dump(data))
    message = _problem(lambda: load_config(where, recorded=True))
    _expect(message, where, ".".join(path), action, noun="setting")


MODELS_CONFIG = """model_config_list {
  config {
    name: "heart"
    base_path: "/models/heart"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 } }
  }
}
"""
MODELS_CONFIG_CASES = {
    "delete-name": ('    name: "heart"\n', "", "key 'model_config_list.config[0].name' is missing"),
    "delete-base_path": (
        '    base_path: "/models/heart"\n',
        "",
        "key 'model_config_list.config[0].base_path' is missing",
    ),
    "retype-name": ('name: "heart"', "name: 5", "key 'name' (line 3): Expected string"),
    "retype-base_path": ('base_path: "/models/heart"', "base_path: 5", "key 'base_path' (line 4): Expected string"),
    "retype-versions": ("versions: 1", 'versions: "one"', "key 'versions' (line 6): Couldn't parse integer"),
    "retype-config": ("  config {\n", "  config: 5\n  config {\n", "key 'config' (line 2): Expected"),
    "unknown-key": ("model_platform", "model_platfrom", "key 'model_platfrom' (line 5): Message type"),
}


@pytest.mark.parametrize("name", list(MODELS_CONFIG_CASES))
def test_models_config(tmp_path, name):
    from mkd_tf.export.serving import read_models_config

    old, new, problem = MODELS_CONFIG_CASES[name]
    assert old in MODELS_CONFIG
    (tmp_path / "models.config").write_text(MODELS_CONFIG.replace(old, new, 1))
    message = _problem(lambda: read_models_config(tmp_path))
    assert message.startswith(f"{tmp_path / 'models.config'}: ") and problem in message, message


def test_the_base_files_load(manifest, record, history, recorded_config, tmp_path):
    """The unchanged files pass: every case above fails because of its one change."""
    from mkd_tf.export.serving import read_models_config

    cache_module.check_manifest("manifest.json", manifest)
    (tmp_path / "cache.json").write_text(json.dumps(record))
    assert read_cache_record(tmp_path) == record
    (tmp_path / "history.json").write_text(json.dumps(history))
    assert read_history(tmp_path / "history.json") == history
    check_dataset_json("dataset.json", DATASET)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded_config))
    assert load_config(tmp_path / "config.yaml", recorded=True) == load_config()
    (tmp_path / "models.config").write_text(MODELS_CONFIG)
    assert read_models_config(tmp_path).model_config_list.config[0].name == "heart"


# --- cross-checks ----------------------------------------------------------------------------------------


def test_label_values_must_name_the_classes_with_distinct_values(manifest, record, tmp_path):
    data = copy.deepcopy(manifest)
    data["modalities"]["target"]["label_values"]["myocardium"] = data["modalities"]["target"]["label_values"][
        "left_atrium"
    ]
    message = _problem(lambda: cache_module.check_manifest("m.json", data))
    assert message.startswith("m.json: key 'modalities.target.label_values' gives ") and "the same value" in message
    data = copy.deepcopy(manifest)
    data["classes"] = data["classes"][:2]
    message = _problem(lambda: cache_module.check_manifest("m.json", data))
    assert (
        message.startswith("m.json: key 'modalities.target.label_values' names ") and "but the classes are" in message
    )
    data = copy.deepcopy(record)
    del data["assistant"]["label_values"][data["classes"][1]]
    (tmp_path / "cache.json").write_text(json.dumps(data))
    assert "key 'assistant.label_values' names" in _problem(lambda: read_cache_record(tmp_path))


def test_an_intensity_rule_needs_the_keys_of_its_kind(manifest, record, tmp_path):
    data = copy.deepcopy(manifest)
    del data["modalities"]["target"]["volumes"][0]["inverse"]["intensity"]["window"]
    assert _problem(lambda: cache_module.check_manifest("m.json", data)) == (
        "m.json: key 'modalities.target.volumes[0].inverse.intensity.window' is missing"
    )
    data = copy.deepcopy(record)
    data["target_intensity"]["window"] = "wide"
    (tmp_path / "cache.json").write_text(json.dumps(data))
    assert _problem(lambda: read_cache_record(tmp_path)) == (
        f"{tmp_path / 'cache.json'}: key 'target_intensity.window' must be a list of numbers, got str"
    )


def test_label_arrays_holding_more_classes_than_the_manifest_names_are_refused(tiny, tmp_path):
    """A manifest edited to 2 classes over label arrays holding 0-7 would train and score nonsense."""
    cache = Path(shutil.copytree(tiny[1], tmp_path / "cache"))
    data = json.loads((cache / "manifest.json").read_text())
    data["classes"] = data["classes"][:2]
    for role in ("target", "assistant"):
        values = data["modalities"][role]["label_values"]
        data["modalities"][role]["label_values"] = {name: values[name] for name in data["classes"]}
    (cache / "manifest.json").write_text(json.dumps(data))
    message = _problem(lambda: SliceCache(cache))
    assert message.startswith(f"{cache / 'target' / 'labels.u8'}: holds class index 7, but key 'classes' of ")
    assert message.endswith("lists 2 classes (background, myocardium)")


# --- through the CLI: one line, exit 2, nothing written ---------------------------------------------------


def one_line_error(outcome):
    assert outcome.exit_code == 2, outcome.output
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert "Traceback" not in outcome.output
    return lines[0]


def _broken_cache(tiny, tmp_path, key):
    cache = Path(shutil.copytree(tiny[1], tmp_path / "cache"))
    data = json.loads((cache / "manifest.json").read_text())
    parent, last = (data, key) if "." not in key else (data["modalities"]["target"]["volumes"][0], key.split(".")[-1])
    del parent[last]
    (cache / "manifest.json").write_text(json.dumps(data))
    return cache


@pytest.mark.parametrize(
    "key, dotted",
    [
        ("preprocess", "preprocess"),
        ("volume.case_id", "modalities.target.volumes[0].case_id"),
        ("volume.inverse", "modalities.target.volumes[0].inverse"),
    ],
)
def test_info_refuses_a_manifest_missing_a_key(tiny, tmp_path, key, dotted):
    cache = _broken_cache(tiny, tmp_path, key)
    outcome = CliRunner().invoke(cli, ["info", str(cache)])
    assert one_line_error(outcome) == f"error: {cache / 'manifest.json'}: key '{dotted}' is missing"


def test_train_on_a_manifest_missing_a_key_writes_nothing(tiny, tmp_path):
    cache = _broken_cache(tiny, tmp_path, "preprocess")
    out = tmp_path / "run"
    outcome = CliRunner().invoke(cli, ["train", str(cache), "--out", str(out), "--quiet"])
    assert one_line_error(outcome) == f"error: {cache / 'manifest.json'}: key 'preprocess' is missing"
    assert not out.exists()


def _copy_run(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "file, key", [("cache.json", "preprocess"), ("cache.json", "target"), ("config.yaml", "method")]
)
def test_evaluate_a_run_missing_a_key_writes_nothing(run, tiny, tmp_path, file, key):
    folder = _copy_run(run, tmp_path)
    path = folder / file
    loads, dumps = (json.loads, json.dumps) if file.endswith(".json") else (yaml.safe_load, yaml.safe_dump)
    data = loads(path.read_text())
    del data[key]
    path.write_text(dumps(data))
    before = _snapshot(folder)
    outcome = CliRunner().invoke(cli, ["evaluate", str(folder), "--cache", str(tiny[1])])
    noun = "setting" if file == "config.yaml" else "key"
    assert one_line_error(outcome) == f"error: {path}: {noun} '{key}' is missing"
    assert _snapshot(folder) == before


def test_resuming_on_a_garbage_history_writes_nothing(run, tiny, tmp_path):
    folder = _copy_run(run, tmp_path)
    (folder / "history.json").write_text(json.dumps({"epochs": "many", "best": None}))
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.tiny_overrides(method="target-only"))
    before = _snapshot(folder)
    outcome = CliRunner().invoke(cli, ["train", str(tiny[1]), "--out", str(folder), "--config", str(config), "--quiet"])
    assert one_line_error(outcome) == (f"error: {folder / 'history.json'}: key 'epochs' must be a list, got str")
    assert _snapshot(folder) == before
    (folder / "history.json").write_text("{not json")
    outcome = CliRunner().invoke(cli, ["train", str(tiny[1]), "--out", str(folder), "--config", str(config), "--quiet"])
    assert one_line_error(outcome).startswith(f"error: {folder / 'history.json'}: invalid JSON")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_resuming_from_a_damaged_checkpoint_writes_nothing(run, tiny, tmp_path, damage):
    folder = _copy_run(run, tmp_path)
    (data,) = (folder / "checkpoints").glob("ckpt-1.data-*")
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[:-1])
    else:
        data.unlink()
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.tiny_overrides(method="target-only"))
    before = _snapshot(folder)
    outcome = CliRunner().invoke(cli, ["train", str(tiny[1]), "--out", str(folder), "--config", str(config), "--quiet"])
    expected = (
        f"error: {data}: cannot read the checkpoint to resume from: truncated or corrupt weights file"
        if damage == "truncated"
        else f"error: {folder / 'checkpoints' / 'ckpt-1'}: the checkpoint has no .data-* file: it is incomplete"
    )
    assert one_line_error(outcome).startswith(expected)
    assert _snapshot(folder) == before


def test_prepare_refuses_a_dataset_json_whose_channel_names_is_a_list(tiny, tmp_path):
    from tests.conftest import write_nnunet

    phantom = Path(tiny[0])
    target, _ = write_nnunet(tmp_path / "Dataset001_CT", phantom / "ct_train", NNUNET_TARGET_LABELS, "CT")
    spec = json.loads((target / "dataset.json").read_text())
    spec["channel_names"] = ["CT"]
    (target / "dataset.json").write_text(json.dumps(spec))
    out = tmp_path / "cache"
    outcome = CliRunner().invoke(
        cli, ["prepare", "--target", str(target), "--assistant", str(phantom / "mr_train"), "--out", str(out)]
    )
    assert one_line_error(outcome) == (
        f"error: {target / 'dataset.json'}: key 'channel_names' must be a mapping, got list"
    )
    assert not out.exists()
