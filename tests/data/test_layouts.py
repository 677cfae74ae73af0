"""layouts: finding cases in MM-WHS 2017 and nnU-Net v2 raw folders, matching labels by name."""

import json

import pytest

from mkd_tf.data.layouts import MMWHS_FOUR, MMWHS_LABELS, discover, match_labels, structure_names
from mkd_tf.errors import MkdError
from tests.conftest import NNUNET_ASSISTANT_LABELS, NNUNET_TARGET_LABELS, copy_phantom, write_nnunet


def _message(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_mmwhs_label_values_are_the_challenge_values():
    assert MMWHS_LABELS == {
        "background": 0,
        "myocardium": 205,
        "left_atrium": 420,
        "left_ventricle": 500,
        "right_atrium": 550,
        "right_ventricle": 600,
        "ascending_aorta": 820,
        "pulmonary_artery": 850,
    }
    assert MMWHS_FOUR == ("myocardium", "left_atrium", "left_ventricle", "ascending_aorta")


def test_mmwhs_modality_folder(phantom_root):
    dataset = discover(phantom_root / "mr_train")
    assert (dataset.layout, dataset.modality) == ("mmwhs", "mr")
    assert [c.case_id for c in dataset.cases] == ["mr_train_1001", "mr_train_1002"]
    case = dataset.cases[1]
    assert case.image == phantom_root / "mr_train" / "mr_train_1002_image.nii.gz"
    assert case.label == phantom_root / "mr_train" / "mr_train_1002_label.nii.gz"
    assert dataset.labels == MMWHS_LABELS


def test_mmwhs_root_needs_a_modality(phantom_root):
    with pytest.raises(MkdError) as info:
        discover(phantom_root)
    assert "ct_train, mr_train" in _message(info) and "--target-modality" in _message(info)
    ct = discover(phantom_root, "CT")
    assert ct.root == phantom_root / "ct_train" and ct.modality == "ct" and len(ct.cases) == 3
    with pytest.raises(MkdError) as info:
        discover(phantom_root, "pet")
    assert _message(info) == f"{phantom_root}: no pet_train/ folder (found ct_train, mr_train)"


def test_case_without_label_file(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    (root / "ct_train" / "ct_train_1002_label.nii.gz").unlink()
    labels = {c.case_id: c.label for c in discover(root / "ct_train").cases}
    assert labels["ct_train_1002"] is None and labels["ct_train_1001"] is not None


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(MkdError) as info:
        discover(tmp_path / "nope")
    assert _message(info) == f"{tmp_path / 'nope'}: folder not found"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(MkdError) as info:
        discover(tmp_path / "file.txt")
    assert _message(info).endswith("file.txt: not a folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MkdError) as info:
        discover(tmp_path / "empty")
    assert _message(info) == f"{tmp_path / 'empty'}: folder is empty"
    with pytest.raises(MkdError) as info:
        discover(tmp_path)
    assert "not an MM-WHS 2017 folder" in _message(info)


def test_folder_mixing_modalities_is_refused(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    (root / "mr_train" / "mr_train_1001_image.nii.gz").rename(root / "ct_train" / "mr_train_1001_image.nii.gz")
    with pytest.raises(MkdError) as info:
        discover(root / "ct_train")
    assert "mixes modalities ['ct', 'mr']" in _message(info)


def test_nnunet_folder(phantom_root, tmp_path):
    folder, _ = write_nnunet(
        tmp_path / "Dataset001_Heart",
        phantom_root / "ct_train",
        NNUNET_TARGET_LABELS,
        "CT",
        drop_label_of=("ct_train_1003",),
    )
    dataset = discover(folder)
    assert (dataset.layout, dataset.modality) == ("nnunet", "ct")
    assert dataset.labels == NNUNET_TARGET_LABELS
    assert dataset.label_source == str(folder / "dataset.json")
    assert [c.case_id for c in dataset.cases] == ["ct_train_1001", "ct_train_1002", "ct_train_1003"]
    assert dataset.cases[0].image == folder / "imagesTr" / "ct_train_1001_0000.nii.gz"
    assert dataset.cases[0].label == folder / "labelsTr" / "ct_train_1001.nii.gz"
    assert dataset.cases[2].label is None


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("{not json", "invalid JSON"),
        ({"channel_names": {"0": "CT"}}, "key 'labels' is missing"),
        ({"labels": {"background": 0, "heart": [1, 2]}}, "key 'labels.heart' is a region [1, 2]; only integer labels"),
        ({"labels": {"heart": 1}}, "key 'labels' has no background (value 0)"),
        ({"labels": {}}, "key 'labels' is empty"),
        ({"labels": {"background": 0, "heart": 1.5}}, "key 'labels.heart' must be a whole number, got 1.5"),
        (
            {"labels": {"background": 0, "heart": 1, "aorta": 1}},
            "key 'labels' gives heart and aorta the same value 1",
        ),
        (
            {"labels": {"background": 0, "heart": 1}, "channel_names": ["CT"]},
            "key 'channel_names' must be a mapping, got list",
        ),
    ],
)
def test_nnunet_bad_dataset_json(tmp_path, spec, problem):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    with pytest.raises(MkdError) as info:
        discover(tmp_path)
    message = _message(info)
    assert message.startswith(f"{tmp_path / 'dataset.json'}: ") and problem in message


def test_nnunet_without_images(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "heart": 1}}))
    with pytest.raises(MkdError) as info:
        discover(tmp_path)
    assert _message(info) == f"{tmp_path}: nnU-Net folder has no imagesTr/"
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(MkdError) as info:
        discover(tmp_path)
    assert _message(info) == f"{tmp_path / 'imagesTr'}: no *_0000.nii.gz images found"


def test_labels_are_matched_by_name_not_id(phantom_root, tmp_path):
    target, _ = write_nnunet(tmp_path / "t", phantom_root / "ct_train", NNUNET_TARGET_LABELS, "CT")
    assistant, _ = write_nnunet(tmp_path / "a", phantom_root / "mr_train", NNUNET_ASSISTANT_LABELS, "MR")
    classes = match_labels(discover(target), discover(assistant))
    # The target's order decides the class indices.
    assert classes == list(NNUNET_TARGET_LABELS)
    assert classes == ["background"] + [n for n in MMWHS_LABELS if n != "background"]


def test_unmatched_names_fail_or_are_dropped(phantom_root, tmp_path):
    target_labels = dict(NNUNET_TARGET_LABELS, coronary_artery=8)
    assistant_labels = {k: v for k, v in NNUNET_ASSISTANT_LABELS.items() if k != "pulmonary_artery"}
    target, _ = write_nnunet(tmp_path / "t", phantom_root / "ct_train", target_labels, "CT")
    assistant, _ = write_nnunet(tmp_path / "a", phantom_root / "mr_train", assistant_labels, "MR")
    with pytest.raises(MkdError) as info:
        match_labels(discover(target), discover(assistant))
    message = _message(info)
    assert message.startswith(str(target / "dataset.json"))
    assert "['pulmonary_artery', 'coronary_artery'] only in target" in message
    assert "--ignore-unmatched" in message
    classes = match_labels(discover(target), discover(assistant), ignore_unmatched=True)
    assert classes == [
        "background",
        "myocardium",
        "left_atrium",
        "left_ventricle",
        "right_atrium",
        "right_ventricle",
        "ascending_aorta",
    ]


def test_no_common_names(phantom_root, tmp_path):
    target, _ = write_nnunet(tmp_path / "t", phantom_root / "ct_train", {"background": 0, "myocardium": 1}, "CT")
    assistant, _ = write_nnunet(tmp_path / "a", phantom_root / "mr_train", {"background": 0, "left_atrium": 1}, "MR")
    with pytest.raises(MkdError) as info:
        match_labels(discover(target), discover(assistant), ignore_unmatched=True)
    assert "share no label names" in _message(info)


def test_four_structures(phantom_root, tmp_path):
    ct, mr = discover(phantom_root / "ct_train"), discover(phantom_root / "mr_train")
    assert match_labels(ct, mr, structures=4) == [
        "background",
        "myocardium",
        "left_atrium",
        "left_ventricle",
        "ascending_aorta",
    ]
    assert match_labels(ct, mr, structures=7) == list(MMWHS_LABELS)
    assert structure_names(ct) == list(MMWHS_LABELS)[1:]
    folder, _ = write_nnunet(tmp_path / "t", phantom_root / "ct_train", NNUNET_TARGET_LABELS, "CT")
    with pytest.raises(MkdError) as info:
        structure_names(discover(folder), 4)
    assert "--structures 4 is not available (dataset has 7 structures)" in _message(info)


def test_mmwhs_label_without_image(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    image = root / "mr_train" / "mr_train_1002_image.nii.gz"
    image.unlink()
    with pytest.raises(MkdError) as info:
        discover(root / "mr_train")
    label = root / "mr_train" / "mr_train_1002_label.nii.gz"
    assert _message(info) == f"{label}: label file without its image (expected {image})"


def test_mmwhs_label_pairs_by_case_not_by_extension(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    folder = root / "ct_train"
    label = folder / "ct_train_1001_label.nii.gz"
    label.rename(folder / "ct_train_1001_label.nii")  # an uncompressed label next to a .nii.gz image
    case = discover(folder).cases[0]
    assert case.case_id == "ct_train_1001" and case.label == folder / "ct_train_1001_label.nii"
    (folder / "ct_train_1001_image.nii").write_bytes(b"")
    with pytest.raises(MkdError) as info:
        discover(folder)
    assert _message(info) == (
        f"{folder / 'ct_train_1001_image.nii.gz'}: a second image file of case ct_train_1001 "
        "(the other is ct_train_1001_image.nii); keep one"
    )


def test_nnunet_label_without_image(phantom_root, tmp_path):
    folder, _ = write_nnunet(tmp_path / "Dataset001_Heart", phantom_root / "ct_train", NNUNET_TARGET_LABELS, "CT")
    image = folder / "imagesTr" / "ct_train_1001_0000.nii.gz"
    image.unlink()
    with pytest.raises(MkdError) as info:
        discover(folder)
    assert _message(info) == (
        f"{folder / 'labelsTr' / 'ct_train_1001.nii.gz'}: label file without its image (expected {image})"
    )


def test_nnunet_labels_tr_that_is_a_file(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "heart": 1}}))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "imagesTr" / "case_0000.nii.gz").write_bytes(b"")
    (tmp_path / "labelsTr").write_text("oops")
    with pytest.raises(MkdError) as info:
        discover(tmp_path)
    assert _message(info) == f"{tmp_path / 'labelsTr'}: is not a folder (expected labelsTr/ holding the label files)"


def test_layouts_are_registered_and_evaluation_asks_the_layout_for_its_labels(tmp_path):
    """discover() tries the registered layouts in order; a new one is one registration."""
    from mkd_tf.data import layouts

    assert list(layouts.LAYOUTS) == ["nnunet", "mmwhs"]
    assert layouts.defined_labels({"layout": "mmwhs", "label_values": {"background": 0}}) == MMWHS_LABELS
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "scan.txt").write_text("x")
    custom = layouts.Layout(
        "flat",
        lambda root: (root / "scan.txt").exists(),
        lambda root, modality: layouts.Dataset(root, "flat", "ct", [], {"background": 0, "organ": 7}, "flat"),
        lambda modality: {"organ": 7, "other_organ": 9},
        "a test layout",
    )
    registered = dict(layouts.LAYOUTS)
    try:
        layouts.register_layout(custom)
        assert discover(folder).layout == "flat"
        record = {"layout": "flat", "label_values": {"background": 0, "organ": 7}}
        assert layouts.defined_labels(record) == {"background": 0, "organ": 7, "other_organ": 9}
        with pytest.raises(ValueError, match="already registered"):
            layouts.register_layout(custom)
    finally:
        layouts.LAYOUTS.clear()
        layouts.LAYOUTS.update(registered)
