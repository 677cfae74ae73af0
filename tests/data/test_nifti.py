"""nifti: reading real users' files with one-line errors, and atomic writes."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from mkd_tf.data import nifti
from mkd_tf.data.nifti import Volume, check_same_grid, from_canonical, load_image, load_label, save_volume, to_canonical
from mkd_tf.errors import MkdError

# Array axes (A, R, I) in world RAS, like the phantom's MRI: permuted and flipped.
PERMUTED = np.array([[0.0, 2.0, 0.0, -30.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, -3.0, 40.0], [0, 0, 0, 1]])


def _image(shape=(12, 10, 8), seed=0):
    return (np.random.default_rng(seed).random(shape) * 1000 - 200).astype(np.float32)


def _one_line(exc_info, *parts):
    message = str(exc_info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def _no_temporaries(folder):
    return [p.name for p in os.scandir(folder) if ".tmp-" in p.name]


def test_round_trip_keeps_values_dtype_affine_and_spacing(tmp_path):
    data = _image()
    path = save_volume(tmp_path / "sub" / "a.nii.gz", data, PERMUTED)
    volume = load_image(path)
    assert volume.data.dtype == np.float32 and volume.data.shape == (12, 10, 8)
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, PERMUTED)
    # Column norms of the affine: axis 0 runs along A (1.5 mm), axis 1 along R (2 mm), axis 2 along I (3 mm).
    assert volume.spacing == pytest.approx((1.5, 2.0, 3.0))
    assert volume.path == str(path)
    label = np.zeros((12, 10, 8), np.uint16)
    label[2:5, 3:7, 1:4] = 850
    save_volume(tmp_path / "l.nii", label, PERMUTED, np.uint16)
    assert nib.load(str(tmp_path / "l.nii")).get_data_dtype() == np.uint16
    loaded = load_label(tmp_path / "l.nii")
    assert loaded.data.dtype == np.int32
    np.testing.assert_array_equal(loaded.data, label.astype(np.int32))
    assert _no_temporaries(tmp_path) == [] and _no_temporaries(tmp_path / "sub") == []


def test_trailing_singleton_fourth_axis_is_a_3d_volume(tmp_path):
    data = _image((6, 5, 4))
    nib.save(nib.Nifti1Image(data[..., None], np.eye(4)), str(tmp_path / "a.nii.gz"))
    np.testing.assert_array_equal(load_image(tmp_path / "a.nii.gz").data, data)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / "nope.nii.gz")
    _one_line(info, "nope.nii.gz", "file not found")
    with pytest.raises(MkdError) as info:
        load_label(tmp_path)
    _one_line(info, str(tmp_path), "not a file")


@pytest.mark.parametrize("keep", [0.5, -10, -4])
def test_truncated_gzip_is_refused(tmp_path, keep):
    """Cut in the compressed data or inside the 8-byte CRC/length trailer: both refused."""
    save_volume(tmp_path / "a.nii.gz", _image(), np.eye(4))
    raw = (tmp_path / "a.nii.gz").read_bytes()
    cut = int(len(raw) * keep) if keep > 0 else len(raw) + keep
    (tmp_path / "cut.nii.gz").write_bytes(raw[:cut])
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / "cut.nii.gz")
    _one_line(info, "cut.nii.gz", "truncated")


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz"])
def test_voxel_data_cut_short_is_one_line_naming_the_file(tmp_path, name):
    """Uncompressed, nibabel's own message has two lines; compressed, a complete gzip of a cut file."""
    save_volume(tmp_path / "a.nii", _image(), np.eye(4))  # 352-byte header + 12*10*8 float32 = 4192 bytes
    raw = (tmp_path / "a.nii").read_bytes()[:-100]
    (tmp_path / name).write_bytes(gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw)
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / name)
    message = _one_line(info)
    assert message == (
        f"{tmp_path / name}: truncated or corrupt: the header's 12x10x8 float32 voxels need 4192 bytes, "
        "the file holds 4092 bytes"
    )


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_a_header_claiming_more_voxels_than_the_file_holds_is_refused_before_allocating(tmp_path, name, monkeypatch):
    save_volume(tmp_path / "a.nii", _image(), np.eye(4))
    raw = bytearray((tmp_path / "a.nii").read_bytes())
    raw[40:48] = np.array([3, 32767, 32767, 32767], np.int16).tobytes()  # dim[0..3]
    (tmp_path / name).write_bytes(gzip.compress(bytes(raw), mtime=0) if name.endswith(".gz") else bytes(raw))

    def no_voxels(*args, **kwargs):
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(nifti, "_read_array", no_voxels)
    with pytest.raises(MkdError) as info:
        load_label(tmp_path / name)
    assert _one_line(info) == (
        f"{tmp_path / name}: truncated or corrupt: the header's 32767x32767x32767 float32 voxels need "
        "128.0 TiB, the file holds 4192 bytes"
    )


def test_flipped_byte_in_compressed_data_is_refused(tmp_path):
    """nibabel alone decodes many such files to wrong voxels; the gzip CRC must catch every one."""
    save_volume(tmp_path / "a.nii.gz", _image((16, 16, 16)), np.eye(4))
    raw = (tmp_path / "a.nii.gz").read_bytes()
    for position in range(200, len(raw) - 8, len(raw) // 25):
        broken = bytearray(raw)
        broken[position] ^= 0x55
        (tmp_path / "b.nii.gz").write_bytes(bytes(broken))
        with pytest.raises(MkdError) as info:
            load_image(tmp_path / "b.nii.gz")
        _one_line(info, "b.nii.gz")


def test_header_cut_short_is_refused(tmp_path):
    save_volume(tmp_path / "a.nii.gz", _image(), np.eye(4))
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "a.nii.gz").read_bytes()[:60])
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / "cut.nii.gz")
    _one_line(info, "cut.nii.gz")


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.nii.gz", b"patient notes, not an image\n" * 20),  # not gzip at all
        ("zipped.nii.gz", gzip.compress(b"patient notes, not an image\n" * 20, mtime=0)),  # gzip, not NIfTI inside
        ("plain.nii", b"patient notes, not an image\n" * 20),
        ("empty.nii.gz", b""),
    ],
    # ids from the names: the test ids must be the same in every pytest-xdist worker
    ids=["notes", "zipped", "plain", "empty"],
)
def test_non_nifti_file_with_nifti_name_is_refused(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / name)
    _one_line(info, name, "not a NIfTI file")


@pytest.mark.parametrize(
    "offset, value, problem",
    [
        (70, np.int16(3), "invalid NIfTI header (data code 3 not recognized)"),  # no such datatype
        (70, np.int16(0), "invalid NIfTI header (data code 0 not supported)"),  # DT_UNKNOWN
        (108, np.float32(128.0), "invalid NIfTI header (vox offset 128"),  # voxels starting inside the header
        (42, np.int16(-5), "corrupt or truncated data"),  # negative dim[1]
    ],
)
def test_corrupt_header_fields_are_one_line_errors(tmp_path, capfd, offset, value, problem):
    level = nib.imageglobals.logger.level
    save_volume(tmp_path / "a.nii", _image(), np.eye(4))
    raw = bytearray((tmp_path / "a.nii").read_bytes())
    raw[offset : offset + value.nbytes] = value.tobytes()
    (tmp_path / "a.nii").write_bytes(bytes(raw))
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / "a.nii")
    _one_line(info, "a.nii", problem)
    # nibabel's own header log lines are silenced (the CLI prints only the error) and restored after.
    assert capfd.readouterr().err == ""
    assert nib.imageglobals.logger.level == level


def test_four_dimensional_image_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6, 2), np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / "4d.nii.gz")
    _one_line(info, "4d.nii.gz", "expected a 3-D volume, got shape (8, 8, 6, 2)")


def test_two_dimensional_image_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(tmp_path / "2d.nii.gz"))
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / "2d.nii.gz")
    _one_line(info, "2d.nii.gz", "expected a 3-D volume")


def test_nan_and_inf_voxels_are_counted(tmp_path):
    data = _image()
    data[0, 0, 0], data[3, 2, 1], data[5, 5, 5] = np.nan, np.inf, -np.inf
    save_volume(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / "nan.nii.gz")
    _one_line(info, "nan.nii.gz", "3 NaN/Inf voxels")


def test_label_values_must_be_finite_integers(tmp_path):
    label = np.zeros((6, 6, 6), np.float32)
    label[1, 1, 1] = 205.0
    save_volume(tmp_path / "ok.nii.gz", label, np.eye(4))
    loaded = load_label(tmp_path / "ok.nii.gz")
    assert loaded.data.dtype == np.int32 and loaded.data[1, 1, 1] == 205 and loaded.data.sum() == 205
    label[2, 2, 2] = 0.5
    save_volume(tmp_path / "half.nii.gz", label, np.eye(4))
    with pytest.raises(MkdError) as info:
        load_label(tmp_path / "half.nii.gz")
    _one_line(info, "half.nii.gz", "non-integer")
    label[2, 2, 2] = np.nan
    save_volume(tmp_path / "nan.nii.gz", label, np.eye(4))
    with pytest.raises(MkdError) as info:
        load_label(tmp_path / "nan.nii.gz")
    _one_line(info, "nan.nii.gz", "NaN/Inf")


def test_singular_affine_is_refused(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[2, 2] = 0.0
    image = nib.Nifti1Image(_image(), None)
    image.set_sform(affine, code=1)  # save_volume cannot write it: nibabel refuses it as a qform
    nib.save(image, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(MkdError) as info:
        load_image(tmp_path / "flat.nii.gz")
    _one_line(info, "flat.nii.gz", "affine")


def test_check_same_grid():
    image = Volume(np.zeros((4, 5, 6), np.float32), PERMUTED, "img.nii.gz")
    check_same_grid(image, Volume(np.zeros((4, 5, 6), np.int32), PERMUTED + 5e-4, "lab.nii.gz"))  # writer noise
    with pytest.raises(MkdError) as info:
        check_same_grid(image, Volume(np.zeros((4, 5, 7), np.int32), PERMUTED, "lab.nii.gz"))
    _one_line(info, "lab.nii.gz", "shape (4, 5, 7) does not match image img.nii.gz shape (4, 5, 6)")
    shifted = PERMUTED.copy()
    shifted[0, 3] += 2.5
    with pytest.raises(MkdError) as info:
        check_same_grid(image, Volume(np.zeros((4, 5, 6), np.int32), shifted, "lab.nii.gz"))
    _one_line(info, "lab.nii.gz", "affine differs from image img.nii.gz (max difference 2.5 mm)")


def test_canonical_reorientation_is_exact_and_invertible():
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    canonical, affine, ornt = to_canonical(data, PERMUTED)
    # Axis 0 runs along A, axis 1 along R, axis 2 along I: canonical (R, A, S) is (axis 1, axis 0, reversed axis 2).
    np.testing.assert_array_equal(canonical, np.transpose(data, (1, 0, 2))[:, :, ::-1])
    np.testing.assert_allclose(affine[:3, :3], np.diag([2.0, 1.5, 3.0]))
    # The same voxel keeps its world position: canonical voxel (0, 0, 0) is array voxel (0, 0, 5).
    np.testing.assert_allclose(affine[:3, 3], (PERMUTED @ [0, 0, 5, 1])[:3])
    np.testing.assert_array_equal(from_canonical(canonical, ornt), data)


def test_save_volume_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = save_volume(tmp_path / "a.nii.gz", _image(seed=1), np.eye(4))
    before = path.read_bytes()

    def half_written_then_disk_full(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"\x1f\x8b partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti.nib, "save", half_written_then_disk_full)
    with pytest.raises(OSError):
        save_volume(path, _image(seed=2), np.eye(4))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]
    np.testing.assert_array_equal(load_image(path).data, _image(seed=1))


def test_save_volume_replaces_an_existing_file(tmp_path):
    save_volume(tmp_path / "a.nii.gz", _image(seed=1), np.eye(4))
    save_volume(tmp_path / "a.nii.gz", _image(seed=2), np.eye(4))
    np.testing.assert_array_equal(load_image(tmp_path / "a.nii.gz").data, _image(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]
