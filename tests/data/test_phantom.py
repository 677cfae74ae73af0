"""The synthetic MM-WHS phantom: layout, labels, grids, determinism, appearance gap, atomic writing."""

import os

import nibabel as nib
import numpy as np
import pytest

from mkd_tf.data import phantom
from mkd_tf.data.layouts import MMWHS_LABELS, discover
from mkd_tf.data.nifti import load_image, load_label
from mkd_tf.data.phantom import TISSUES, make_anatomy, modality_grid, phantom_case, tissue_labels, write_phantom
from mkd_tf.errors import MkdError
from mkd_tf.files import lock_folder

SHAPE = (48, 48, 24)
IDS = ("1001", "1002")
STRUCTURES = [name for name in MMWHS_LABELS if name != "background"]
BLOOD_LABELS = [MMWHS_LABELS[name] for name in STRUCTURES if name != "myocardium"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("phantom") / "data", n_ct=2, n_mr=2, shape=SHAPE, seed=0)


def _case_files(root, modality, case_id):
    folder = root / f"{modality}_train"
    return folder / f"{modality}_train_{case_id}_image.nii.gz", folder / f"{modality}_train_{case_id}_label.nii.gz"


def _world_centroid(mask, affine):
    index = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ index + affine[:3, 3]


def test_layout_is_mmwhs_and_discoverable(root):
    assert sorted(p.name for p in root.iterdir()) == ["ct_train", "mr_train"]
    for modality in ("ct", "mr"):
        expected = sorted(f"{modality}_train_{i}_{kind}.nii.gz" for i in IDS for kind in ("image", "label"))
        assert sorted(p.name for p in (root / f"{modality}_train").iterdir()) == expected
        dataset = discover(root / f"{modality}_train")
        assert dataset.layout == "mmwhs" and dataset.modality == modality
        assert [c.case_id for c in dataset.cases] == [f"{modality}_train_{i}" for i in IDS]
        assert all(c.label is not None and c.label.exists() for c in dataset.cases)
        assert dataset.labels == MMWHS_LABELS
    # The root works too, once a modality is chosen.
    assert discover(root, modality="mr").modality == "mr"


def test_labels_hold_exactly_the_seven_mmwhs_structures(root):
    for modality in ("ct", "mr"):
        for case_id in IDS:
            image_path, label_path = _case_files(root, modality, case_id)
            stored = nib.load(str(label_path))
            assert stored.get_data_dtype() == np.uint16
            values = set(np.unique(np.asarray(stored.dataobj)).tolist())
            assert values == set(MMWHS_LABELS.values()), (label_path.name, values)
            image, label = load_image(image_path), load_label(label_path)
            assert nib.load(str(image_path)).get_data_dtype() == np.int16
            assert image.data.shape == label.data.shape
            assert np.array_equal(image.affine, label.affine)


def test_grids_hand_computed():
    # CT: 153.6 x 153.6 x 120 mm over (48, 48, 24) -> 3.2 x 3.2 x 5 mm, axes L, P, S, centred on 0.
    ct_shape, ct_affine = modality_grid("ct", SHAPE)
    assert ct_shape == SHAPE
    np.testing.assert_allclose(
        ct_affine,
        [[-3.2, 0, 0, 3.2 * 23.5], [0, -3.2, 0, 3.2 * 23.5], [0, 0, 5.0, -5.0 * 11.5], [0, 0, 0, 1]],
        atol=1e-9,
    )
    # MR: 1.25 x 1.25 x 1.2 coarser -> 4 x 4 x 6 mm; 153.6 / 4 = 38.4 -> 38, 120 / 6 = 20; axes A, R, I.
    mr_shape, mr_affine = modality_grid("mr", SHAPE)
    assert mr_shape == (38, 38, 20)
    np.testing.assert_allclose(
        mr_affine,
        [[0, 4.0, 0, -4.0 * 18.5], [4.0, 0, 0, -4.0 * 18.5], [0, 0, -6.0, 6.0 * 9.5], [0, 0, 0, 1]],
        atol=1e-9,
    )
    # Default shape: the spacings the issue asks for.
    assert modality_grid("ct")[0] == (96, 96, 48)
    np.testing.assert_allclose(np.abs(np.diag(modality_grid("ct")[1])[:3]), [1.6, 1.6, 2.5])
    assert modality_grid("mr")[0] == (77, 77, 40)


def test_ct_and_mr_files_have_different_spacing_and_orientation(root):
    ct = load_image(_case_files(root, "ct", "1001")[0])
    mr = load_image(_case_files(root, "mr", "1001")[0])
    np.testing.assert_allclose(ct.spacing, (3.2, 3.2, 5.0), rtol=1e-6)
    np.testing.assert_allclose(mr.spacing, (4.0, 4.0, 6.0), rtol=1e-6)
    assert nib.aff2axcodes(ct.affine) == ("L", "P", "S")
    assert nib.aff2axcodes(mr.affine) == ("A", "R", "I")
    assert ct.data.shape == SHAPE and mr.data.shape == (38, 38, 20)


def test_anatomy_is_built_in_world_mm():
    # The same patient (same random stream) sampled on the CT and the MR grid: every structure
    # lands at the same world position with the same physical volume, whatever the voxels.
    sampled = {}
    for modality in ("ct", "mr"):
        shape, affine = modality_grid(modality, (96, 96, 48))
        labels = tissue_labels(make_anatomy(np.random.default_rng(7), shape, affine))
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
        sampled[modality] = {
            name: (
                _world_centroid(labels == MMWHS_LABELS[name], affine),
                (labels == MMWHS_LABELS[name]).sum() * voxel_ml,
            )
            for name in STRUCTURES
        }
    for name in STRUCTURES:
        (ct_centre, ct_ml), (mr_centre, mr_ml) = sampled["ct"][name], sampled["mr"][name]
        assert np.linalg.norm(ct_centre - mr_centre) < 1.0, name
        assert abs(ct_ml - mr_ml) / ct_ml < 0.05, (name, ct_ml, mr_ml)


def test_written_cases_are_phantom_case(root):
    # phantom_case rebuilds a written case exactly, so its tissue map can measure the files.
    for modality in ("ct", "mr"):
        case = phantom_case(modality, 1002, seed=0, shape=SHAPE)
        image_path, label_path = _case_files(root, modality, "1002")
        np.testing.assert_array_equal(load_image(image_path).data, case.image)
        np.testing.assert_array_equal(load_label(label_path).data, case.label)
        np.testing.assert_array_equal(case.label, tissue_labels(case.tissues))


def test_same_seed_same_bytes_other_seed_other_data(root, tmp_path):
    again = write_phantom(tmp_path / "again", n_ct=2, n_mr=2, shape=SHAPE, seed=0)
    other = write_phantom(tmp_path / "other", n_ct=2, n_mr=2, shape=SHAPE, seed=1)
    for modality in ("ct", "mr"):
        for case_id in IDS:
            for first, second, third in zip(
                _case_files(root, modality, case_id),
                _case_files(again, modality, case_id),
                _case_files(other, modality, case_id),
            ):
                assert first.read_bytes() == second.read_bytes()
                assert not np.array_equal(load_image(first).data, load_image(third).data)


def test_cases_are_different_patients(root):
    for modality in ("ct", "mr"):
        first, second = (load_label(_case_files(root, modality, i)[1]) for i in IDS)
        heart_first, heart_second = first.data > 0, second.data > 0
        dice = 2 * (heart_first & heart_second).sum() / (heart_first.sum() + heart_second.sum())
        assert dice < 0.9, dice
        shift = np.linalg.norm(
            _world_centroid(first.data == MMWHS_LABELS["left_ventricle"], first.affine)
            - _world_centroid(second.data == MMWHS_LABELS["left_ventricle"], second.affine)
        )
        assert shift > 1.0


def _tissue_means(case):
    blood = np.isin(case.label, BLOOD_LABELS)
    return {
        "blood": case.image[blood].mean(),
        "myocardium": case.image[case.label == MMWHS_LABELS["myocardium"]].mean(),
        "fat": case.image[case.tissues == TISSUES["fat"]].mean(),
        "lung": case.image[case.tissues == TISSUES["lung"]].mean(),
        "air": case.image[case.tissues == TISSUES["air"]].mean(),
    }


@pytest.mark.parametrize("case_number", [1001, 1002])
def test_ct_intensities_in_hounsfield_units(case_number):
    means = _tissue_means(phantom_case("ct", case_number, seed=0, shape=SHAPE))
    assert means["blood"] > means["myocardium"] > means["fat"]
    assert 220 < means["blood"] < 420
    assert 70 < means["myocardium"] < 140
    assert -160 < means["fat"] < -60
    assert abs(means["lung"] + 800) < 60
    assert abs(means["air"] + 1000) < 15


@pytest.mark.parametrize("case_number", [1001, 1002])
def test_mr_intensities_bssfp_like(case_number):
    case = phantom_case("mr", case_number, seed=0, shape=SHAPE)
    means = _tissue_means(case)
    assert means["blood"] > 2.5 * means["myocardium"]
    assert means["fat"] > 2.5 * means["myocardium"]
    assert means["lung"] < 0.5 * means["myocardium"]
    assert case.image.min() >= 0  # magnitude image (Rician noise)


def test_appearance_gap_fat_versus_myocardium():
    # The ordering an MRI-trained segmentor learns (fat brighter than myocardium) is reversed in CT.
    ct = _tissue_means(phantom_case("ct", 1001, seed=3, shape=SHAPE))
    mr = _tissue_means(phantom_case("mr", 1001, seed=3, shape=SHAPE))
    assert ct["fat"] < ct["myocardium"] and mr["fat"] > mr["myocardium"]


def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MkdError, match="not empty"):
        write_phantom(out, n_ct=1, n_mr=1, shape=SHAPE)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(MkdError, match="not a folder"):
        write_phantom(tmp_path / "file", n_ct=1, n_mr=1, shape=SHAPE)
    with pytest.raises(MkdError, match="shape"):
        write_phantom(tmp_path / "bad", n_ct=1, n_mr=1, shape=(48, 48))


def test_empty_out_dir_is_filled_and_no_temporary_folder_is_left(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert write_phantom(out, n_ct=1, n_mr=1, shape=SHAPE) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert len(list(out.rglob("*.nii.gz"))) == 4
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real_save = phantom.save_volume
    calls = []

    def failing_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(phantom, "save_volume", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_phantom(tmp_path / "data", n_ct=2, n_mr=1, shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_write_is_cleaned_up_by_the_next_one_and_nothing_else_is(tmp_path):
    """SIGKILL leaves the hidden staging folder; the next `write_phantom` of that folder removes it, but
    not a look-alike holding other files, nor the staging folder a running writer holds locked."""
    killed = tmp_path / ".data.tmp-0123abcd"
    (killed / "ct_train").mkdir(parents=True)
    (killed / "ct_train" / "ct_train_1001_image.nii.gz").write_bytes(b"\x1f\x8b")
    (killed / "ct_train" / ".ct_train_1002_label.tmp-89abcdef.nii.gz").write_bytes(b"\x1f")  # mid-write
    foreign = tmp_path / ".data.tmp-456789ab"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    running = tmp_path / ".data.tmp-cdef0123"
    (running / "mr_train").mkdir(parents=True)
    held = lock_folder(running)
    try:
        write_phantom(tmp_path / "data", n_ct=1, n_mr=1, shape=SHAPE)
    finally:
        os.close(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.tmp-456789ab", ".data.tmp-cdef0123", "data"]
    assert (foreign / "notes.txt").read_text() == "mine"
    assert len(list((tmp_path / "data").rglob("*.nii.gz"))) == 4
