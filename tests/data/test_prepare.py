"""prepare: datasets -> slice cache (classes, splits, labelled subsets, inverse parameters, atomicity)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from mkd_tf.data import prepare as prepare_module
from mkd_tf.data.cache import HAS_LABEL, SPLIT, SPLITS, VOLUME, SliceCache
from mkd_tf.data.layouts import MMWHS_LABELS
from mkd_tf.data.nifti import load_image, load_label, save_volume, to_canonical
from mkd_tf.data.prepare import PrepareOptions, prepare_cache, split_fractions
from mkd_tf.data.preprocess import PreprocessConfig, labels_to_original
from mkd_tf.errors import MkdError
from tests.conftest import (
    CT_SPACING,
    FAST_CONFIG,
    FAST_SIZE,
    MR_SPACING,
    NNUNET_ASSISTANT_LABELS,
    NNUNET_TARGET_LABELS,
    case_files,
    copy_phantom,
    dice,
    leftovers,
    write_nnunet,
)

SEVEN = [name for name in MMWHS_LABELS if name != "background"]


def _prepare(phantom_root, out, **options):
    config = options.pop("preprocess", FAST_CONFIG)
    target = options.pop("target", phantom_root / "ct_train")
    assistant = options.pop("assistant", phantom_root / "mr_train")
    return SliceCache(prepare_cache(target, assistant, out, PrepareOptions(preprocess=config, **options)))


@pytest.fixture(scope="module")
def mmwhs_cache(phantom_root, tmp_path_factory):
    return _prepare(phantom_root, tmp_path_factory.mktemp("prepare") / "cache")


def _volume_labels(cache, role, volume):
    start, end = volume["slices"]
    return np.asarray(cache.labels(role)[start:end])


def _class_values(cache, role):
    values = cache.modality(role)["label_values"]
    return [values[name] for name in cache.classes]


# --- the split -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, fractions, counts",
    [
        (10, (0.6, 0.2, 0.2), (6, 2, 2)),
        (5, (0.6, 0.2, 0.2), (3, 1, 1)),
        (4, (0.6, 0.2, 0.2), (2, 1, 1)),  # 0.8 rounds to 1
        (3, (0.6, 0.2, 0.2), (1, 1, 1)),  # at least one each from three cases on
        (2, (0.6, 0.2, 0.2), (2, 0, 0)),  # 0.4 rounds to 0; too few cases to force val/test
        (1, (0.6, 0.2, 0.2), (1, 0, 0)),
        (4, (0.5, 0.5, 0.0), (2, 2, 0)),
        (3, (0.0, 0.0, 1.0), (1, 0, 2)),  # train always keeps one
        (6, (3, 1, 2), (3, 1, 2)),  # fractions need not sum to 1
    ],
)
def test_split_counts(n, fractions, counts):
    cases = [f"case_{i}" for i in range(n)]
    assignment = split_fractions(cases, fractions, seed=0)
    assert sorted(assignment) == sorted(cases)
    assert tuple(list(assignment.values()).count(s) for s in SPLITS) == counts


def test_split_is_seeded_and_independent_of_listing_order():
    cases = [f"case_{i}" for i in range(10)]
    first = split_fractions(cases, (0.6, 0.2, 0.2), seed=3)
    assert split_fractions(cases[::-1], (0.6, 0.2, 0.2), seed=3) == first
    others = [split_fractions(cases, (0.6, 0.2, 0.2), seed=s) for s in range(4, 8)]
    assert any(other != first for other in others)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, -0.2, 0.6), (0, 0, 0)])
def test_bad_fractions(fractions):
    with pytest.raises(MkdError, match="expected three non-negative fractions"):
        split_fractions(["a", "b"], fractions, 0)


# --- the MM-WHS cache ------------------------------------------------------------------------------


def test_mmwhs_cache_classes_volumes_and_split(mmwhs_cache):
    cache = mmwhs_cache
    assert cache.classes == list(MMWHS_LABELS) and cache.size == FAST_SIZE
    target = cache.modality("target")
    assert (target["name"], target["layout"]) == ("ct", "mmwhs")
    assert target["label_values"] == MMWHS_LABELS
    expected = split_fractions(["ct_train_1001", "ct_train_1002", "ct_train_1003"], (0.6, 0.2, 0.2), 0)
    assert {v["case_id"]: v["split"] for v in cache.volumes("target")} == expected
    assert sorted(expected.values()) == ["test", "train", "val"]
    assert cache.manifest["split"] == {"seed": 0, "fractions": [0.6, 0.2, 0.2], "file": None, "target_labeled": None}
    # Every assistant case teaches: all train, all labelled.
    assert [(v["case_id"], v["split"], v["labelled"]) for v in cache.volumes("assistant")] == [
        ("mr_train_1001", "train", True),
        ("mr_train_1002", "train", True),
    ]
    # CT keeps its 16 axial planes at native spacing; MRI's 13 planes at 9 mm become floor(12 * 9 / 7.5) + 1 = 15.
    assert [v["slices"] for v in cache.volumes("target")] == [[0, 16], [16, 32], [32, 48]]
    assert [v["slices"] for v in cache.volumes("assistant")] == [[0, 15], [15, 30]]
    assert cache.manifest["preprocess"]["spacing"] == list(CT_SPACING)


def test_slice_table_agrees_with_volume_records(mmwhs_cache):
    for role in ("target", "assistant"):
        table = mmwhs_cache.slice_table(role)
        covered = np.zeros(len(table), bool)
        for index, volume in enumerate(mmwhs_cache.volumes(role)):
            rows = table[volume["slices"][0] : volume["slices"][1]]
            assert (rows[:, VOLUME] == index).all()
            assert (rows[:, SPLIT] == SPLITS.index(volume["split"])).all()
            assert (rows[:, HAS_LABEL] == int(volume["labelled"])).all()
            covered[volume["slices"][0] : volume["slices"][1]] = True
        assert covered.all()


def test_test_cases_never_contribute_training_slices(mmwhs_cache):
    train_rows = set(mmwhs_cache.indices("target", "train").tolist())
    held_out = [v for v in mmwhs_cache.volumes("target") if v["split"] != "train"]
    assert len(held_out) == 2
    for volume in held_out:
        assert train_rows.isdisjoint(range(*volume["slices"]))
    train_volumes = {int(v) for v in mmwhs_cache.slice_table("target")[sorted(train_rows), VOLUME]}
    assert {mmwhs_cache.volumes("target")[i]["split"] for i in train_volumes} == {"train"}


def test_ct_slices_are_the_hand_computed_window_of_the_file(mmwhs_cache, phantom_root):
    """At native spacing the cache is the file reoriented to RAS, HU-windowed and padded to 48 x 48."""
    volume = mmwhs_cache.volumes("target")[1]
    image = load_image(volume["image"])
    # CT array axes run L, P, S: RAS order flips the first two axes.
    canonical = image.data[::-1, ::-1, :]
    normalised = (np.clip(canonical, -200, 800) + 200) / 1000 * 2 - 1
    start_x, start_y = volume["inverse"]["crop_start"]
    assert start_x < 0 and start_y < 0  # 32 voxels centred in 48: padded on both sides
    slices = mmwhs_cache.images("target")[volume["slices"][0] : volume["slices"][1]]
    inside = slices[:, -start_x : -start_x + 32, -start_y : -start_y + 32]
    np.testing.assert_allclose(inside, np.moveaxis(normalised, 2, 0), atol=1e-6)
    padding = np.ones(slices.shape, bool)
    padding[:, -start_x : -start_x + 32, -start_y : -start_y + 32] = False
    assert np.all(slices[padding] == np.float32(normalised.min()))
    labels = load_label(volume["label"]).data[::-1, ::-1, :]
    lookup = {value: index for index, value in enumerate(MMWHS_LABELS.values())}
    expected = np.vectorize(lookup.get)(labels)
    cached = _volume_labels(mmwhs_cache, "target", volume)
    np.testing.assert_array_equal(
        cached[:, -start_x : -start_x + 32, -start_y : -start_y + 32], np.moveaxis(expected, 2, 0)
    )


def test_mr_slices_are_z_scored_after_percentile_clipping(phantom_root, tmp_path):
    """At MRI's native spacing (no resampling) the z-score is hand-computable from the file."""
    cache = _prepare(phantom_root, tmp_path / "cache", preprocess=replace(FAST_CONFIG, spacing=MR_SPACING))
    volume = cache.volumes("assistant")[0]
    raw = load_image(volume["image"]).data
    canonical, _, _ = to_canonical(raw, load_image(volume["image"]).affine)
    low, high = np.percentile(canonical, (0.5, 99.5))
    clipped = np.clip(canonical, low, high)
    intensity = volume["inverse"]["intensity"]
    assert intensity["kind"] == "zscore"
    assert intensity["clip"] == pytest.approx([low, high], rel=1e-6)
    assert intensity["mean"] == pytest.approx(clipped.mean(), rel=1e-5)
    assert intensity["std"] == pytest.approx(clipped.std(), rel=1e-5)
    expected = np.moveaxis((clipped - clipped.mean()) / clipped.std(), 2, 0)
    start_x, start_y = volume["inverse"]["crop_start"]
    slices = cache.images("assistant")[volume["slices"][0] : volume["slices"][1]]
    assert slices.shape == (13, FAST_SIZE, FAST_SIZE)
    np.testing.assert_allclose(slices[:, -start_x : -start_x + 26, -start_y : -start_y + 26], expected, atol=1e-4)


def test_same_seed_same_split_other_seed_other_split(phantom_root, tmp_path):
    def assignment(seed, name):
        cache = _prepare(phantom_root, tmp_path / name, seed=seed)
        return {v["case_id"]: v["split"] for v in cache.volumes("target")}

    first = assignment(0, "a")
    assert assignment(0, "b") == first
    assert any(assignment(seed, f"s{seed}") != first for seed in (1, 2, 3))


def test_four_structures_turn_the_others_into_background(mmwhs_cache, phantom_root, tmp_path):
    four = _prepare(phantom_root, tmp_path / "four", structures=4)
    assert four.classes == ["background", "myocardium", "left_atrium", "left_ventricle", "ascending_aorta"]
    # Seven-class index -> four-class index: RA, RV and PA become background.
    remap = np.array([0, 1, 2, 3, 0, 0, 4, 0], np.uint8)
    for role in ("target", "assistant"):
        seven = np.asarray(mmwhs_cache.labels(role))
        np.testing.assert_array_equal(np.asarray(four.labels(role)), remap[seven])
        assert set(np.unique(seven)) == set(range(8))  # all seven structures were there to drop
        np.testing.assert_array_equal(np.asarray(four.images(role)), np.asarray(mmwhs_cache.images(role)))
    assert four.modality("target")["label_values"] == {
        "background": 0,
        "myocardium": 205,
        "left_atrium": 420,
        "left_ventricle": 500,
        "ascending_aorta": 820,
    }


# --- nnU-Net with different ids per modality -------------------------------------------------------


@pytest.fixture(scope="module")
def nnunet_pair(phantom_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("nnunet")
    target, _ = write_nnunet(base / "Dataset001_HeartCT", phantom_root / "ct_train", NNUNET_TARGET_LABELS, "CT")
    assistant, _ = write_nnunet(base / "Dataset002_HeartMR", phantom_root / "mr_train", NNUNET_ASSISTANT_LABELS, "MR")
    return target, assistant, _prepare(phantom_root, base / "cache", target=target, assistant=assistant)


def test_nnunet_classes_mean_the_same_structure_in_both_modalities(nnunet_pair, mmwhs_cache):
    _, _, cache = nnunet_pair
    assert cache.classes == list(NNUNET_TARGET_LABELS)
    assert cache.modality("target")["label_values"] == NNUNET_TARGET_LABELS
    assert cache.modality("assistant")["label_values"] == {
        name: NNUNET_ASSISTANT_LABELS[name] for name in NNUNET_TARGET_LABELS
    }
    assert (cache.modality("target")["name"], cache.modality("assistant")["name"]) == ("ct", "mr")
    # The same volumes in the MM-WHS layout: every structure occupies exactly the same cache pixels.
    for role in ("target", "assistant"):
        assert [v["case_id"] for v in cache.volumes(role)] == [v["case_id"] for v in mmwhs_cache.volumes(role)]
        np.testing.assert_array_equal(np.asarray(cache.images(role)), np.asarray(mmwhs_cache.images(role)))
        for name in SEVEN:
            nnunet_mask = np.asarray(cache.labels(role)) == cache.classes.index(name)
            mmwhs_mask = np.asarray(mmwhs_cache.labels(role)) == mmwhs_cache.classes.index(name)
            assert nnunet_mask.any()
            np.testing.assert_array_equal(nnunet_mask, mmwhs_mask, err_msg=f"{role} {name}")


def test_nnunet_voxel_counts_per_structure_match_the_files(nnunet_pair):
    """Counted in the cache and mapped back through the names, each modality's files are reproduced."""
    target, assistant, cache = nnunet_pair
    for role, ids in (("target", NNUNET_TARGET_LABELS), ("assistant", NNUNET_ASSISTANT_LABELS)):
        for volume in cache.volumes(role):
            original = load_label(volume["label"]).data
            restored = labels_to_original(
                _volume_labels(cache, role, volume), volume["inverse"], _class_values(cache, role)
            )
            for name in SEVEN:
                assert (restored == ids[name]).sum() == (original == ids[name]).sum() > 0, (role, name)
    # CT at native spacing: cache voxel counts per class are the files' counts by name.
    labels = np.asarray(cache.labels("target"))
    for name in SEVEN:
        in_files = sum(
            int((load_label(v["label"]).data == NNUNET_TARGET_LABELS[name]).sum()) for v in cache.volumes("target")
        )
        assert int((labels == cache.classes.index(name)).sum()) == in_files


# --- labelled subsets, split files, cases without labels ---------------------------------------------


@pytest.mark.parametrize("target_labelled", [0, 2, 3])
def test_target_labelled_keeps_n_labelled_training_volumes(phantom_root, tmp_path, target_labelled):
    cache = _prepare(phantom_root, tmp_path / "cache", split=(1.0, 0.0, 0.0), target_labelled=target_labelled)
    volumes = cache.volumes("target")
    assert [v["split"] for v in volumes] == ["train"] * 3
    assert sum(v["labelled"] for v in volumes) == target_labelled
    table = cache.slice_table("target")
    for volume in volumes:
        rows = slice(*volume["slices"])
        assert (table[rows, HAS_LABEL] == int(volume["labelled"])).all()
        labels = np.asarray(cache.labels("target")[rows])
        assert (labels.max() > 0) == volume["labelled"]  # unlabelled volumes store background only
    assert len(cache.indices("target", "train", labelled=True)) == 16 * target_labelled
    assert cache.manifest["split"]["target_labeled"] == target_labelled
    assert all(v["labelled"] for v in cache.volumes("assistant"))


def test_target_labelled_zero_keeps_val_and_test_labels(phantom_root, tmp_path):
    cache = _prepare(phantom_root, tmp_path / "cache", target_labelled=0)
    assert {v["split"]: v["labelled"] for v in cache.volumes("target")} == {"train": False, "val": True, "test": True}


def test_target_labelled_more_than_available(phantom_root, tmp_path):
    with pytest.raises(MkdError, match="--target-labelled 2 but only 1 labelled training cases"):
        _prepare(phantom_root, tmp_path / "cache", target_labelled=2)
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []


def test_target_labelled_choice_is_seeded(phantom_root, tmp_path):
    def chosen(seed, name):
        cache = _prepare(phantom_root, tmp_path / name, split=(1.0, 0.0, 0.0), target_labelled=1, seed=seed)
        return [v["case_id"] for v in cache.volumes("target") if v["labelled"]]

    assert chosen(5, "a") == chosen(5, "b")
    assert len({tuple(chosen(seed, f"s{seed}")) for seed in range(6)}) > 1


def _split_file(tmp_path, spec):
    path = tmp_path / "split.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return str(path)


def test_split_file(phantom_root, tmp_path):
    split_file = _split_file(
        tmp_path,
        {
            "target": {"train": ["ct_train_1003"], "val": [], "test": ["ct_train_1001"], "exclude": ["ct_train_1002"]},
            "assistant": {"train": ["mr_train_1002"], "exclude": ["mr_train_1001"]},
        },
    )
    cache = _prepare(phantom_root, tmp_path / "cache", split_file=split_file)
    # Cases the file excludes are left out.
    assert [(v["case_id"], v["split"]) for v in cache.volumes("target")] == [
        ("ct_train_1001", "test"),
        ("ct_train_1003", "train"),
    ]
    assert [v["case_id"] for v in cache.volumes("assistant")] == ["mr_train_1002"]
    assert cache.manifest["split"]["file"] == split_file


def test_split_file_without_assistant_puts_every_assistant_case_in_train(phantom_root, tmp_path):
    split_file = _split_file(
        tmp_path, {"target": {"train": ["ct_train_1001", "ct_train_1002"], "test": ["ct_train_1003"]}}
    )
    cache = _prepare(phantom_root, tmp_path / "cache", split_file=split_file)
    assert [v["split"] for v in cache.volumes("target")] == ["train", "train", "test"]
    assert [v["split"] for v in cache.volumes("assistant")] == ["train", "train"]


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"target": {"train": ["ct_train_1001", "ct_train_9999"]}}, 'target case "ct_train_9999" is not in'),
        (
            {"target": {"train": ["ct_train_1001"], "test": ["ct_train_1001"]}},
            'target case "ct_train_1001" is listed in both train and test',
        ),
        ({"target": {"training": ["ct_train_1001"]}}, 'unknown split "training" for target'),
        (
            {
                "target": {"train": ["ct_train_1001"], "exclude": ["ct_train_1002", "ct_train_1003"]},
                "assistant": {"train": ["ct_train_1002"]},
            },
            'assistant case "ct_train_1002" is not in',
        ),
        (
            {"target": {"train": ["ct_train_1001"], "test": ["ct_train_1003"]}},
            'target cases ct_train_1002 are in none of train, val, test; list each, or under "exclude" to leave it out',
        ),
        (
            {"target": {"train": ["ct_train_1001", "ct_train_1002", "ct_train_1003"]}, "assistant": {"train": []}},
            "assistant cases mr_train_1001, mr_train_1002 are in none of train, val, test",
        ),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_split_file(phantom_root, tmp_path, spec, problem):
    split_file = _split_file(tmp_path, spec)
    with pytest.raises(MkdError) as info:
        _prepare(phantom_root, tmp_path / "cache", split_file=split_file)
    assert str(info.value).startswith(f"{split_file}: ") and problem in str(info.value)
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []


def test_missing_split_file(phantom_root, tmp_path):
    with pytest.raises(MkdError, match="split file not found"):
        _prepare(phantom_root, tmp_path / "cache", split_file=str(tmp_path / "nope.json"))


def test_target_case_without_label_trains_unlabelled(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    case_files(root, "ct", 1002)[1].unlink()
    split_file = _split_file(
        tmp_path, {"target": {"train": ["ct_train_1001", "ct_train_1002"], "test": ["ct_train_1003"]}}
    )
    cache = _prepare(root, tmp_path / "cache", split_file=split_file)
    records = {v["case_id"]: v for v in cache.volumes("target")}
    assert records["ct_train_1002"]["label"] is None and not records["ct_train_1002"]["labelled"]
    assert records["ct_train_1001"]["labelled"] and records["ct_train_1003"]["labelled"]
    # Without a split file the unlabelled case is a training case, not part of the seeded split.
    cache = _prepare(root, tmp_path / "cache2", split=(0.0, 0.0, 1.0))
    records = {v["case_id"]: (v["split"], v["labelled"]) for v in cache.volumes("target")}
    assert records.pop("ct_train_1002") == ("train", False)
    # The two labelled cases are split (train keeps one, the rest is test).
    assert sorted(records.values()) == [("test", True), ("train", True)]


def test_test_case_without_label_is_refused(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    image, label = case_files(root, "ct", 1003)
    label.unlink()
    split_file = _split_file(
        tmp_path, {"target": {"train": ["ct_train_1001", "ct_train_1002"], "test": ["ct_train_1003"]}}
    )
    with pytest.raises(MkdError) as info:
        _prepare(root, tmp_path / "cache", split_file=split_file)
    assert str(info.value) == f"{image}: test case has no label file"
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []


# --- failures in the middle leave nothing --------------------------------------------------------------


def test_corrupt_last_volume_leaves_no_cache_and_no_temporary(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    image = case_files(root, "mr", 1002)[0]  # the last volume read: everything else is already written
    image.write_bytes(image.read_bytes()[:-100])
    lines = []
    with pytest.raises(MkdError) as info:
        prepare_cache(
            root / "ct_train",
            root / "mr_train",
            tmp_path / "cache",
            PrepareOptions(preprocess=FAST_CONFIG),
            progress=lines.append,
        )
    assert str(info.value).startswith(f"{image}: corrupt or truncated")
    assert len(lines) == 4  # three CT volumes and the first MRI volume were processed
    assert not (tmp_path / "cache").exists()
    assert leftovers(tmp_path / "cache") == []


def test_unknown_label_value_is_refused(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    label_path = case_files(root, "mr", 1001)[1]
    label = load_label(label_path)
    data = label.data.copy()
    data[3, 4, 5] = 77
    save_volume(label_path, data, label.affine, np.uint16)
    with pytest.raises(MkdError) as info:
        _prepare(root, tmp_path / "cache")
    assert str(info.value) == (f"{label_path}: unknown label values [77] (known: {sorted(MMWHS_LABELS.values())})")
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []


def test_unexpected_exception_leaves_no_cache_and_a_failed_overwrite_keeps_the_old_one(
    phantom_root, tmp_path, monkeypatch
):
    out = tmp_path / "cache"
    _prepare(phantom_root, out)
    before = (out / "manifest.json").read_text()
    real = prepare_module.preprocess_volume
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "preprocess_volume", crash_on_third)
    with pytest.raises(RuntimeError):
        _prepare(phantom_root, tmp_path / "other")
    assert not (tmp_path / "other").exists() and leftovers(tmp_path / "other") == []
    calls.clear()
    with pytest.raises(RuntimeError):
        _prepare(phantom_root, out, overwrite=True)
    assert (out / "manifest.json").read_text() == before
    SliceCache(out)  # still verifies
    assert leftovers(out) == []


def test_existing_cache_is_kept_without_overwrite(phantom_root, mmwhs_cache):
    before = (mmwhs_cache.path / "manifest.json").read_text()
    with pytest.raises(MkdError, match="already exists"):
        _prepare(phantom_root, mmwhs_cache.path)
    assert (mmwhs_cache.path / "manifest.json").read_text() == before


# --- back to the original grid ----------------------------------------------------------------------


@pytest.mark.parametrize("role, native", [("target", CT_SPACING), ("assistant", MR_SPACING)])
def test_labels_back_to_the_original_file(phantom_root, tmp_path, role, native):
    """Exact at the file's own spacing (MRI's affine is permuted and flipped); Dice > 0.9 elsewhere."""
    exact = _prepare(phantom_root, tmp_path / "native", preprocess=replace(FAST_CONFIG, spacing=native))
    other = _prepare(phantom_root, tmp_path / "other", preprocess=replace(FAST_CONFIG, spacing=(4.0, 4.0, 6.0)))
    for cache in (exact, other):
        for volume in cache.volumes(role):
            original = load_label(volume["label"]).data
            restored = labels_to_original(
                _volume_labels(cache, role, volume), volume["inverse"], _class_values(cache, role)
            )
            assert restored.shape == original.shape
            if cache is exact:
                np.testing.assert_array_equal(restored, original)
            else:
                for name in SEVEN:
                    value = MMWHS_LABELS[name]
                    assert dice(restored == value, original == value) > 0.9, (volume["case_id"], name)
    if role == "assistant":
        assert np.asarray(exact.volumes(role)[0]["inverse"]["ornt"]).tolist() == [[1, 1], [0, 1], [2, -1]]


def test_coarser_spacing_loses_detail_but_keeps_the_grid(phantom_root, tmp_path):
    """Sanity check of the Dice test above: a much coarser grid does not round-trip exactly."""
    cache = _prepare(
        phantom_root, tmp_path / "coarse", preprocess=PreprocessConfig(spacing=(9.6, 9.6, 15.0), size=FAST_SIZE)
    )
    volume = cache.volumes("target")[0]
    original = load_label(volume["label"]).data
    restored = labels_to_original(
        _volume_labels(cache, "target", volume), volume["inverse"], _class_values(cache, "target")
    )
    assert restored.shape == original.shape
    assert not np.array_equal(restored, original)
    assert dice(restored > 0, original > 0) > 0.5


# --- options checked before anything is read or written -------------------------------------------------


@pytest.mark.parametrize("fractions", [(float("nan"), 0.5, 0.5), (float("inf"), 0, 0), ("a", "b", "c")])
def test_non_finite_fractions(fractions):
    with pytest.raises(MkdError, match="expected three non-negative fractions"):
        split_fractions(["a", "b"], fractions, 0)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"preprocess": replace(FAST_CONFIG, spacing=(0.0, 0.0, 0.0))},
            "--spacing: every value must be a finite number",
        ),
        ({"split": (float("nan"), 0.5, 0.5)}, "--split (nan, 0.5, 0.5): expected three non-negative fractions"),
        ({"target_labelled": -1}, "--target-labelled: must be an integer >= 0, got -1"),
    ],
)
def test_bad_options_fail_before_anything_is_read(phantom_root, tmp_path, options, message):
    options.setdefault("preprocess", FAST_CONFIG)
    with pytest.raises(MkdError) as info:
        prepare_cache(tmp_path / "missing", tmp_path / "missing", tmp_path / "cache", PrepareOptions(**options))
    assert str(info.value).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_library_crop_is_reported_or_refused(phantom_root, tmp_path):
    small = replace(FAST_CONFIG, size=16)
    with pytest.raises(MkdError) as info:
        _prepare(phantom_root, tmp_path / "refused", preprocess=small, allow_crop=False)
    assert str(info.value).startswith(
        "--size 16: the 16x16 window at --spacing 4.8,4.8,7.5 mm cuts off labelled voxels: target ct_train_1001 loses "
    )
    assert list(tmp_path.iterdir()) == []
    lines = []
    cache = SliceCache(
        prepare_cache(
            phantom_root / "ct_train",
            phantom_root / "mr_train",
            tmp_path / "allowed",
            PrepareOptions(preprocess=small, allow_crop=True),
            progress=lines.append,
        )
    )
    dropped = cache.manifest["crop"]["dropped_label_voxels"]
    assert cache.manifest["crop"]["allow_crop"] is True
    assert sorted(dropped["target"]) == ["ct_train_1001", "ct_train_1002", "ct_train_1003"]
    assert sum("labelled voxels outside the window" in line for line in lines) == 5
