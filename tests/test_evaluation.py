"""`evaluate_run` / `mkd evaluate` against an independent computation.

The reference: `mkd predict` writes the label map of a test volume on the file's own grid, and
medpy (a separate implementation) scores it against the label file with the file's voxel spacing.
Agreement proves the inverse mapping (cache slices -> original grid) and the metrics end to end.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from medpy.metric import binary

from mkd_cli.main import main as cli
from mkd_tf.data.cache import SliceCache
from mkd_tf.data.layouts import MMWHS_LABELS
from mkd_tf.data.nifti import load_label
from mkd_tf.data.prepare import PrepareOptions, prepare_cache
from mkd_tf.data.preprocess import PreprocessConfig
from mkd_tf.errors import MkdError
from mkd_tf.evaluation import evaluate_run
from mkd_tf.metrics import volume_diagonal
from tests.scripts import tiny_runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_runs.tiny_cache(tmp_path_factory)


def medpy_scores(predicted, reference, spacing, values):
    """name -> (dice, assd, hd95) with medpy, and the project's documented values for empty masks."""
    diagonal = volume_diagonal(reference.shape, spacing)
    scores, both_present = {}, 0
    for name, value in values.items():
        p, r = predicted == value, reference == value
        if p.any() and r.any():
            both_present += 1
            scores[name] = (
                binary.dc(p, r),
                binary.assd(p, r, voxelspacing=spacing),
                binary.hd95(p, r, voxelspacing=spacing),
            )
        elif not p.any() and not r.any():
            scores[name] = (1.0, 0.0, 0.0)
        else:
            scores[name] = (0.0, diagonal, diagonal)
    return scores, both_present


def predict(run, image, out, which):
    outcome = CliRunner().invoke(cli, ["predict", str(run), str(image), "-o", str(out), "--which", which])
    assert outcome.exit_code == 0, outcome.output
    return load_label(out).data


def check_against_medpy(run_path, cache, result, tmp_path, predictors):
    structures = {name: MMWHS_LABELS[name] for name in cache.classes[1:]}
    compared = 0
    for volume in cache.volumes("target", "test"):
        reference = load_label(volume["label"])
        for predictor in predictors:
            predicted = predict(run_path, volume["image"], tmp_path / f"{predictor}.nii.gz", predictor)
            expected, both_present = medpy_scores(predicted, reference.data, reference.spacing, structures)
            compared += both_present
            case = result["cases"][predictor][volume["case_id"]]
            assert list(case) == list(structures)
            for name, (dice, assd, hd95) in expected.items():
                assert case[name]["dice"] == pytest.approx(dice, abs=1e-9), (predictor, name)
                assert case[name]["assd"] == pytest.approx(assd, rel=1e-6, abs=1e-6), (predictor, name)
                assert case[name]["hd95"] == pytest.approx(hd95, rel=1e-6, abs=1e-6), (predictor, name)
    return compared


def test_evaluate_run_agrees_with_medpy_on_the_predicted_files(tmp_path_factory, tmp_path, data):
    run = tiny_runs.main_mkd_run(tmp_path_factory)
    cache = SliceCache(data[1])
    result = evaluate_run(run.path, "test")
    compared = check_against_medpy(run.path, cache, result, tmp_path, ["syn", "real", "ensemble"])
    # The comparison is not only about empty masks: surface distances were really compared.
    assert compared >= 3

    # The summary is the mean (and std) over cases of the per-case values.
    for predictor, summary in result["summary"].items():
        cases = list(result["cases"][predictor].values())
        for name in cache.classes[1:]:
            dice = [case[name]["dice"] for case in cases]
            assert summary[name]["dice"]["mean"] == pytest.approx(np.mean(dice))
    written = json.loads((run.path / "metrics.json").read_text())
    assert written["cases"] == result["cases"] and written["split"] == "test" and written["checkpoint"] == "best"


def test_structures_the_cache_does_not_keep_count_as_background(tmp_path_factory, tmp_path, data):
    """A 4-structure cache (MYO/LA/LV/AA): the other structures of the label file are background."""
    phantom, _ = data
    cache_path = prepare_cache(
        phantom / "ct_train",
        phantom / "mr_train",
        tmp_path / "cache4",
        PrepareOptions(structures=4, preprocess=PreprocessConfig(spacing=tiny_runs.SPACING, size=tiny_runs.SIZE)),
    )
    cache = SliceCache(cache_path)
    assert cache.classes == ["background", "myocardium", "left_atrium", "left_ventricle", "ascending_aorta"]
    from mkd_tf.training import train

    with tiny_runs.eager():
        train(
            cache_path,
            tmp_path / "run",
            overrides=tiny_runs.tiny_overrides(method="target-only", schedule={"steps_per_epoch": 1}),
            verbose=0,
        )
    result = evaluate_run(tmp_path / "run", "test")
    check_against_medpy(tmp_path / "run", cache, result, tmp_path, ["real"])
    volume = cache.volumes("target", "test")[0]
    predicted = load_label(tmp_path / "real.nii.gz").data
    assert set(np.unique(predicted)) <= {0, 205, 420, 500, 820}
    assert set(result["cases"]["real"][volume["case_id"]]) == set(cache.classes[1:])


def test_evaluate_cli_val_split_and_last_checkpoint(tmp_path_factory, data):
    run = tiny_runs.main_mkd_run(tmp_path_factory)
    outcome = CliRunner().invoke(cli, ["evaluate", str(run.path), "--split", "val", "--checkpoint", "last"])
    assert outcome.exit_code == 0, outcome.output
    written = json.loads((run.path / "metrics.json").read_text())
    cache = SliceCache(data[1])
    assert written["split"] == "val" and written["checkpoint"] == "last"
    assert list(written["cases"]["ensemble"]) == [v["case_id"] for v in cache.volumes("target", "val")]
    assert "### mkd — ensemble (val, 1 volumes)" in outcome.output
    assert f"wrote {run.path}/metrics.json, metrics.csv, metrics.md" in outcome.output


def test_evaluation_errors_are_one_line(tmp_path_factory, tmp_path, data):
    run = tiny_runs.main_mkd_run(tmp_path_factory)
    with pytest.raises(MkdError, match="not a training run"):
        evaluate_run(tmp_path, "test")
    outcome = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "missing")])
    assert outcome.exit_code == 2
    assert outcome.stderr.count("\n") == 1 and "not a training run (no config.yaml)" in outcome.stderr
    # A cache with other classes than the run's is refused.
    phantom, _ = data
    other = prepare_cache(
        phantom / "ct_train",
        phantom / "mr_train",
        tmp_path / "cache4",
        PrepareOptions(structures=4, preprocess=PreprocessConfig(spacing=tiny_runs.SPACING, size=tiny_runs.SIZE)),
    )
    with pytest.raises(MkdError, match="differ from the run's"):
        evaluate_run(run.path, "test", cache_path=other)


def test_a_truncated_checkpoint_is_one_line(tmp_path_factory, tmp_path, data):
    import shutil
    from pathlib import Path

    run = Path(shutil.copytree(tiny_runs.main_mkd_run(tmp_path_factory).path, tmp_path / "run"))
    for stale in ("metrics.json", "metrics.csv", "metrics.md"):
        (run / stale).unlink(missing_ok=True)
    weights = next((run / "best").glob("weights.data-*"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1])
    outcome = CliRunner().invoke(cli, ["evaluate", str(run)])
    assert outcome.exit_code == 2, outcome.output
    assert outcome.stderr.startswith("error: ") and outcome.stderr.count("\n") == 1
    assert f"{run / 'best'}: cannot read the best checkpoint: truncated or corrupt weights file" in outcome.stderr
    assert not any((run / name).exists() for name in ("metrics.json", "metrics.csv", "metrics.md"))


def _run_copy(tmp_path_factory, tmp_path):
    import shutil
    from pathlib import Path

    run = Path(shutil.copytree(tiny_runs.main_mkd_run(tmp_path_factory).path, tmp_path / "run"))
    for stale in ("metrics.json", "metrics.csv", "metrics.md"):
        (run / stale).unlink(missing_ok=True)
    return run


def test_a_cache_prepared_at_another_spacing_is_refused(tmp_path_factory, tmp_path, data):
    run = _run_copy(tmp_path_factory, tmp_path)
    phantom, _ = data
    other = prepare_cache(
        phantom / "ct_train",
        phantom / "mr_train",
        tmp_path / "other",
        PrepareOptions(preprocess=PreprocessConfig(spacing=(4.8, 4.8, 7.5), size=tiny_runs.SIZE)),
    )
    outcome = CliRunner().invoke(cli, ["evaluate", str(run), "--cache", str(other)])
    assert outcome.exit_code == 2 and outcome.stderr.count("\n") == 1, outcome.output
    assert outcome.stderr == (
        f"error: {other}: prepared with preprocess.spacing [4.8, 4.8, 7.5], but the run {run} was trained on "
        "[6.4, 6.4, 10.0]; evaluate on a cache prepared with the run's settings\n"
    )
    assert not any((run / name).exists() for name in ("metrics.json", "metrics.csv", "metrics.md"))


def test_a_label_file_changed_since_prepare_is_refused(tmp_path_factory, tmp_path):
    from tests.conftest import copy_phantom

    run = _run_copy(tmp_path_factory, tmp_path)
    phantom = copy_phantom(tiny_runs.tiny_cache(tmp_path_factory)[0], tmp_path / "phantom")
    cache = prepare_cache(
        phantom / "ct_train",
        phantom / "mr_train",
        tmp_path / "cache",
        PrepareOptions(preprocess=PreprocessConfig(spacing=tiny_runs.SPACING, size=tiny_runs.SIZE)),
    )
    (volume,) = SliceCache(cache).volumes("target", "test")
    label = load_label(volume["label"])
    assert volume["label_file"]["bytes"] == len(open(volume["label"], "rb").read())
    changed = np.array(label.data)
    changed[changed == 205] = 0  # the myocardium is gone from the reference
    from mkd_tf.data.nifti import save_volume

    save_volume(volume["label"], changed, label.affine, changed.dtype)
    outcome = CliRunner().invoke(cli, ["evaluate", str(run), "--cache", str(cache)])
    assert outcome.exit_code == 2 and outcome.stderr.count("\n") == 1, outcome.output
    assert outcome.stderr == (
        f"error: {volume['label']}: label file changed since `mkd prepare` cached it; prepare the cache again "
        "to score it\n"
    )
    assert not any((run / name).exists() for name in ("metrics.json", "metrics.csv", "metrics.md"))
    # A cache written before the label files were recorded cannot tell: its label file is scored as is.
    manifest = json.loads((cache / "manifest.json").read_text())
    for record in manifest["modalities"]["target"]["volumes"]:
        record.pop("label_file", None)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    result = evaluate_run(run, "test", cache_path=cache)
    assert list(result["cases"]["ensemble"]) == [volume["case_id"]]
