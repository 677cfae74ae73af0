"""Volume metrics against medpy.metric.binary, empty-mask rules, summaries and the streaming Dice."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from medpy.metric import binary  # noqa: E402
from scipy import ndimage  # noqa: E402

from mkd_tf import metrics  # noqa: E402

SPACING = (0.7, 1.3, 2.5)
SHAPE = (20, 24, 16)


def _blob(rng, threshold):
    """A smoothed random field thresholded into one or more irregular blobs."""
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), sigma=2.5)
    return field > threshold * field.std()


def _pairs():
    rng = np.random.default_rng(7)
    pairs = [(_blob(rng, 0.5), _blob(rng, 0.5)) for _ in range(4)]
    # A prediction close to its reference (one dilation), and masks touching the array border.
    reference = _blob(rng, 0.8)
    pairs.append((ndimage.binary_dilation(reference), reference))
    pairs.append((np.ones(SHAPE, bool), _blob(rng, -0.5)))
    # A single voxel (its own surface) against a blob.
    single = np.zeros(SHAPE, bool)
    single[3, 20, 1] = True
    pairs.append((single, _blob(rng, 0.5)))
    return pairs


@pytest.mark.parametrize("index", range(7))
def test_dice_assd_hd95_match_medpy(index):
    prediction, reference = _pairs()[index]
    assert prediction.any() and reference.any()
    expected_dice = binary.dc(prediction, reference)
    assert math.isclose(metrics.dice(prediction, reference), expected_dice, rel_tol=1e-12)
    expected_assd = binary.assd(prediction, reference, voxelspacing=SPACING)
    assert math.isclose(metrics.surface_metrics(prediction, reference, SPACING)["assd"], expected_assd, rel_tol=1e-6)
    expected_hd95 = binary.hd95(prediction, reference, voxelspacing=SPACING)
    assert math.isclose(metrics.surface_metrics(prediction, reference, SPACING)["hd95"], expected_hd95, rel_tol=1e-6)
    # The directed sets are medpy's surface distances, element for element.
    forward, backward = metrics.surface_distances(prediction, reference, SPACING)
    medpy_surface_distances = binary.__surface_distances
    np.testing.assert_allclose(
        np.sort(forward), np.sort(medpy_surface_distances(prediction, reference, SPACING)), rtol=1e-12
    )
    np.testing.assert_allclose(
        np.sort(backward), np.sort(medpy_surface_distances(reference, prediction, SPACING)), rtol=1e-12
    )


def test_assd_is_medpy_05_pooled_not_the_mean_of_directed_means():
    # Documented choice: the pinned medpy's pooled `assd`, not medpy <= 0.4's mean of directed means.
    small = np.zeros(SHAPE, bool)
    small[8:11, 10:13, 6:9] = True
    large = np.zeros(SHAPE, bool)
    large[2:18, 3:21, 2:14] = True
    ours = metrics.surface_metrics(small, large, SPACING)["assd"]
    pooled = binary.assd(small, large, voxelspacing=SPACING)
    directed = (binary.asd(small, large, voxelspacing=SPACING) + binary.asd(large, small, voxelspacing=SPACING)) / 2
    assert math.isclose(ours, pooled, rel_tol=1e-9)
    assert not math.isclose(ours, directed, rel_tol=1e-3)


def test_hand_computed_distances_on_a_line():
    # Two single voxels 3 apart along axis 2 (2.5 mm per step): every distance is 7.5 mm.
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    a[5, 5, 5] = True
    b[5, 5, 8] = True
    assert metrics.dice(a, b) == 0.0
    assert math.isclose(metrics.surface_metrics(a, b, SPACING)["assd"], 7.5)
    assert math.isclose(metrics.surface_metrics(a, b, SPACING)["hd95"], 7.5)


def test_empty_masks():
    empty = np.zeros(SHAPE, bool)
    blob = _blob(np.random.default_rng(1), 0.5)
    diagonal = math.sqrt((20 * 0.7) ** 2 + (24 * 1.3) ** 2 + (16 * 2.5) ** 2)
    assert math.isclose(metrics.volume_diagonal(SHAPE, SPACING), diagonal)
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.surface_metrics(empty, empty, SPACING)["assd"] == 0.0
    assert metrics.surface_metrics(empty, empty, SPACING)["hd95"] == 0.0
    for prediction, reference in ((empty, blob), (blob, empty)):
        assert metrics.dice(prediction, reference) == 0.0
        assert math.isclose(metrics.surface_metrics(prediction, reference, SPACING)["assd"], diagonal)
        assert math.isclose(metrics.surface_metrics(prediction, reference, SPACING)["hd95"], diagonal)


def test_evaluate_volume_with_mmwhs_values():
    rng = np.random.default_rng(3)
    values = {"myocardium": 205, "left_atrium": 420, "left_ventricle": 500, "ascending_aorta": 820}
    reference = np.zeros(SHAPE, np.int16)
    prediction = np.zeros(SHAPE, np.int16)
    reference[_blob(rng, 0.8)] = 205
    prediction[_blob(rng, 0.8)] = 205
    reference[2:8, 2:8, 2:6] = 500
    prediction[3:9, 2:8, 2:6] = 500
    reference[12:16, 14:20, 9:13] = 420  # left atrium missed by the prediction
    prediction[0:2, 0:2, 14:16] = 600  # a structure not scored
    # ascending aorta absent from both
    results = metrics.evaluate_volume(prediction, reference, SPACING, values)
    assert set(results) == set(values)
    for name, value in values.items():
        p, r = prediction == value, reference == value
        assert results[name]["dice"] == metrics.dice(p, r)
        assert results[name]["assd"] == metrics.surface_metrics(p, r, SPACING)["assd"]
        assert results[name]["hd95"] == metrics.surface_metrics(p, r, SPACING)["hd95"]
    # Shifted box 6x6x4 by one voxel along axis 0: overlap 5/6.
    assert math.isclose(results["left_ventricle"]["dice"], 5 / 6)
    assert math.isclose(
        results["myocardium"]["hd95"],
        binary.hd95(prediction == 205, reference == 205, voxelspacing=SPACING),
        rel_tol=1e-6,
    )
    diagonal = metrics.volume_diagonal(SHAPE, SPACING)
    assert results["left_atrium"] == {"dice": 0.0, "assd": diagonal, "hd95": diagonal}
    assert results["ascending_aorta"] == {"dice": 1.0, "assd": 0.0, "hd95": 0.0}


def test_summarize_and_markdown_table():
    rows = [
        {"a": {"dice": 0.8, "assd": 1.0, "hd95": 4.0}, "b": {"dice": 0.6, "assd": 3.0, "hd95": 8.0}},
        {"a": {"dice": 0.9, "assd": 2.0, "hd95": 6.0}, "b": {"dice": 0.5, "assd": 5.0, "hd95": 10.0}},
    ]
    summary = metrics.summarize(rows)
    assert list(summary) == ["a", "b", "overall"]
    assert math.isclose(summary["a"]["dice"]["mean"], 0.85)
    assert math.isclose(summary["a"]["dice"]["std"], 0.05)  # population std of 0.8, 0.9
    assert math.isclose(summary["b"]["assd"]["mean"], 4.0)
    assert math.isclose(summary["b"]["assd"]["std"], 1.0)
    # Overall: per-case means across structures, then mean and std over cases.
    # dice: case 1 -> 0.7, case 2 -> 0.7; assd: 2, 3.5; hd95: 6, 8.
    assert math.isclose(summary["overall"]["dice"]["mean"], 0.7)
    assert math.isclose(summary["overall"]["dice"]["std"], 0.0, abs_tol=1e-12)
    assert math.isclose(summary["overall"]["hd95"]["mean"], 7.0)
    assert math.isclose(summary["overall"]["hd95"]["std"], 1.0)
    table = metrics.markdown_table(summary)
    assert table.splitlines() == [
        "| structure | Dice | ASSD (mm) | HD95 (mm) |",
        "| --- | --- | --- | --- |",
        "| a | 85.0 ± 5.0 | 1.50 ± 0.50 | 5.00 ± 1.00 |",
        "| b | 55.0 ± 5.0 | 4.00 ± 1.00 | 9.00 ± 1.00 |",
        "| overall | 70.0 ± 0.0 | 2.75 ± 0.75 | 7.00 ± 1.00 |",
    ]


def _numpy_dice(label_batches, probability_batches, num_classes):
    intersections = np.zeros(num_classes)
    totals = np.zeros(num_classes)
    for labels, probabilities in zip(label_batches, probability_batches):
        predicted = probabilities.argmax(-1)
        for c in range(num_classes):
            intersections[c] += np.sum((predicted == c) & (labels == c))
            totals[c] += np.sum(predicted == c) + np.sum(labels == c)
    return np.where(totals > 0, 2 * intersections / np.maximum(totals, 1), 1.0)


def test_class_overlaps_summed_over_batches_give_the_split_dice():
    rng = np.random.default_rng(5)
    num_classes = 4
    label_batches = [rng.integers(0, 3, size=(2, 8, 8)) for _ in range(2)]  # class 3 never labelled
    probability_batches = []
    for labels in label_batches:
        logits = rng.standard_normal((2, 8, 8, num_classes)) + 2.0 * np.eye(num_classes)[labels]
        logits[..., 3] -= 10.0  # and never predicted: its Dice is 1 by the package's one rule
        probability_batches.append(keras.ops.convert_to_numpy(keras.ops.softmax(logits)))
    overlaps = sum(
        metrics.class_overlaps(np.argmax(p, -1), labels, num_classes)
        for labels, p in zip(label_batches, probability_batches)
    )
    expected = _numpy_dice(label_batches, probability_batches, num_classes)
    assert expected[3] == 1.0 and 0.3 < expected[1] < 0.99
    np.testing.assert_allclose(metrics.dice_of_overlaps(overlaps), expected, rtol=1e-12)
    # The split's Dice is not the mean of the per-batch Dice.
    per_batch = [
        metrics.dice_of_overlaps(metrics.class_overlaps(np.argmax(p, -1), labels, num_classes))
        for labels, p in zip(label_batches, probability_batches)
    ]
    assert not np.allclose(np.mean(per_batch, axis=0)[1:3], expected[1:3])


def test_one_rule_for_absent_classes_everywhere():
    """metrics.dice, the class counts and the TFLite agreement score a class absent from both as 1.0."""
    from mkd_tf.export.tflite import dice_agreement

    empty = np.zeros((4, 4), np.int32)
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.dice_of_overlaps(metrics.class_overlaps(empty, empty, 3)).tolist() == [1.0, 1.0, 1.0]
    assert dice_agreement(empty, empty, 3) == 1.0
    one = empty.copy()
    one[0, 0] = 1
    # class 1: predicted once, never labelled -> 0; class 2 absent from both -> 1
    assert dice_agreement(one, empty, 3) == 0.5
    for c in (1, 2):
        assert metrics.dice(one == c, empty == c) == metrics.dice_of_overlaps(metrics.class_overlaps(one, empty, 3))[c]
