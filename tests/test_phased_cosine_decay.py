"""PhasedCosineDecay: the formula at phase starts, midpoints and ends, past the end, and its config."""

import math

import pytest

from mkd_tf.phased_cosine_decay import PhasedCosineDecay


def test_each_phase_decays_from_the_full_rate_along_a_cosine():
    schedule = PhasedCosineDecay(2e-3, phase_starts=[0, 60], total_steps=100, alpha=0.1)

    def rate(step):
        return float(schedule(step))

    for start, end in ((0, 60), (60, 100)):
        assert rate(start) == pytest.approx(2e-3)
        assert rate((start + end) / 2) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))
        quarter = start + (end - start) / 4
        assert rate(quarter) == pytest.approx(2e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2), rel=1e-5)
    assert 2e-4 < rate(59) < 2.2e-4  # near alpha * lr just before the restart
    assert rate(100) == rate(500) == pytest.approx(2e-4)  # past the run: the last phase's end value


def test_one_phase_is_the_plain_cosine_decay():
    schedule = PhasedCosineDecay(1e-3, phase_starts=[0], total_steps=40)
    assert [round(float(schedule(t)), 9) for t in (0, 20, 40)] == [1e-3, 5e-4, 0.0]


def test_config_round_trip_and_bad_phases():
    schedule = PhasedCosineDecay(1e-3, [0, 7], 10, alpha=0.2)
    again = PhasedCosineDecay.from_config(schedule.get_config())
    assert [float(again(t)) for t in range(12)] == [float(schedule(t)) for t in range(12)]
    for starts, total in (([5], 10), ([0, 7, 7], 10), ([0, 12], 10), ([], 10)):
        with pytest.raises(ValueError):
            PhasedCosineDecay(1e-3, starts, total)
