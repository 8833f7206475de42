"""rankwise.analysis.stats: bootstrap intervals over items and seeds, paired differences, verdicts."""
import math

import numpy as np
import pytest

from rankwise.analysis.stats import accuracy_with_ci, bootstrap_draws, difference_ci, interval, verdict


def normal_ci(p, n):
    h = 1.96 * math.sqrt(p * (1 - p) / n)
    return p - h, p + h


@pytest.mark.parametrize("k,n", [(15, 30), (24, 120), (90, 100)])
def test_one_seed_is_the_binomial_bootstrap(k, n):
    # One seed, one stratum: the interval is the binomial one, +-1.96 sqrt(p(1-p)/n) to within
    # the bootstrap's own discreteness (1/n) and Monte-Carlo error.
    c = np.array([1] * k + [0] * (n - k))
    r = accuracy_with_ci(c, n_boot=8000, seed=1)
    lo, hi = normal_ci(k / n, n)
    assert r["value"]["mean"] == pytest.approx(k / n)
    assert r["n"]["mean"] == n
    assert r["ci95"]["mean"][0] == pytest.approx(lo, abs=1.5 / n + 0.01)
    assert r["ci95"]["mean"][1] == pytest.approx(hi, abs=1.5 / n + 0.01)


def test_interval_on_30_facts_at_half_is_about_18_points():
    r = accuracy_with_ci([1, 0] * 15, n_boot=8000)
    lo, hi = r["ci95"]["mean"]
    assert 0.30 < hi - lo < 0.40  # the issue's +-18 points


def test_paired_difference_counts_only_the_discordant_items():
    # a and b agree on 180 of 200 items; a is right and b wrong on the other 20. The paired
    # difference is the mean of d = a - b in {0, 1}: 0.1 with the binomial interval of d,
    # far narrower than the unpaired interval of two accuracies near 0.5.
    a = np.zeros(200)
    a[:120] = 1
    b = a.copy()
    b[100:120] = 0
    r = difference_ci(a, b, n_boot=8000, seed=3)
    assert r["effect"] == pytest.approx(0.1)
    lo, hi = normal_ci(0.1, 200)
    assert r["ci95"][0] == pytest.approx(lo, abs=0.012)
    assert r["ci95"][1] == pytest.approx(hi, abs=0.012)
    # unpaired (independent item draws), the same effect would not be significant
    da = accuracy_with_ci(a, n_boot=4000)["ci95"]["mean"]
    db = accuracy_with_ci(b, n_boot=4000)["ci95"]["mean"]
    assert da[0] < db[1]


def test_identical_arms_have_a_zero_width_difference():
    c = np.random.default_rng(0).integers(0, 2, size=(3, 50))
    r = difference_ci(c, c, strata=["x", "y"] * 25)
    assert r["effect"] == 0.0 and r["ci95"] == [0.0, 0.0]


def test_seed_noise_widens_the_interval():
    # Three seeds that disagree a lot: the interval must hold the seed spread, not only item noise.
    rng = np.random.default_rng(0)
    agree = np.tile(rng.integers(0, 2, size=400), (3, 1)).astype(float)
    spread = agree.copy()
    spread[0, :] = 1.0  # one seed right everywhere
    spread[1, :] = 0.0  # one wrong everywhere
    w_agree = np.diff(accuracy_with_ci(agree)["ci95"]["mean"])[0]
    w_spread = np.diff(accuracy_with_ci(spread)["ci95"]["mean"])[0]
    assert w_spread > 3 * w_agree


def test_strata_mean_is_unweighted_and_pooled_is_weighted():
    c = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1], dtype=float)  # A: 4/4, B: 1/6
    st = ["A"] * 4 + ["B"] * 6
    r = accuracy_with_ci(c, st, combine=("mean", "pooled", ("B",)))
    assert r["value"]["A"] == 1.0 and r["value"]["B"] == pytest.approx(1 / 6)
    assert r["value"]["mean"] == pytest.approx((1 + 1 / 6) / 2)
    assert r["value"]["pooled"] == pytest.approx(0.5)
    assert r["n"] == {"A": 4, "B": 6, "mean": 10, "pooled": 10, "('B',)": 6}
    # strata are resampled within themselves: A is always all right
    assert r["ci95"]["A"] == [1.0, 1.0]


def test_per_seed_values_and_draw_sharing():
    c = np.array([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=float)
    r = accuracy_with_ci(c)
    assert r["seeds"]["mean"] == [0.5, 1.0, 0.0]
    assert r["value"]["mean"] == pytest.approx(0.5)
    d1, d2 = bootstrap_draws([c, c], n_boot=50, seed=5)
    assert np.array_equal(d1.boot, d2.boot)  # same item and seed draws for both arms
    d1, d2 = bootstrap_draws([c, c], n_boot=50, seed=5, pair_seeds=False)
    assert not np.array_equal(d1.boot, d2.boot)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="different numbers of items"):
        bootstrap_draws([np.ones(3), np.ones(4)])
    with pytest.raises(ValueError, match="labels"):
        accuracy_with_ci(np.ones(3), strata=["a"])
    with pytest.raises(ValueError, match="NaN"):
        accuracy_with_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="unknown strata"):
        difference_ci(np.ones(4), np.ones(4), strata=list("aabb"), combine="c")


def test_verdict_rule():
    assert verdict([0.01, 0.3]) == "reproduced"
    assert verdict([-0.3, -0.01]) == "contradicted"
    assert verdict([-0.1, 0.2]) == "inconclusive"
    assert verdict([0.0, 0.2]) == "inconclusive"  # lo must be strictly above 0
    assert verdict([-0.2, 0.0]) == "inconclusive"
    assert verdict([None, None]) == "inconclusive"
    assert verdict(None) == "inconclusive"
    assert verdict([float("nan"), 1.0]) == "inconclusive"


def test_interval_ignores_nonfinite_draws():
    assert interval([float("nan")] * 3) == [None, None]
    lo, hi = interval(np.linspace(0, 1, 1001))
    assert lo == pytest.approx(0.025) and hi == pytest.approx(0.975)


def test_per_seed_strata_follow_each_seed_own_labels():
    # Two seeds (two bases) that know different items: each is right exactly on the items its own
    # mastery puts in A. With per-seed strata A is 1.0 and B 0.0 in both; with seed 0's labels
    # for both, seed 1 would look like it knew nothing of A.
    c = np.array([[1] * 5 + [0] * 5, [0] * 5 + [1] * 5], dtype=float)
    st = [["A"] * 5 + ["B"] * 5, ["B"] * 5 + ["A"] * 5]
    r = accuracy_with_ci(c, st, combine=("mean", "pooled", ("A",)), n_boot=500)
    assert r["value"]["A"] == 1.0 and r["value"]["B"] == 0.0 and r["seeds"]["A"] == [1.0, 1.0]
    assert r["ci95"]["A"] == [1.0, 1.0] and r["ci95"]["B"] == [0.0, 0.0]
    assert r["value"]["pooled"] == pytest.approx(0.5) and r["value"]["('A',)"] == 1.0
    assert r["n"]["A"] == 5 and r["n"]["mean"] == 10
    shared = accuracy_with_ci(c, st[0], n_boot=500)
    assert shared["seeds"]["A"] == [1.0, 0.0]


def test_per_seed_strata_equal_rows_give_the_shared_point_estimates():
    rng = np.random.default_rng(2)
    c = rng.integers(0, 2, size=(3, 60)).astype(float)
    labels = list(rng.choice(["D0", "D3", "D4"], size=60))
    a = accuracy_with_ci(c, labels, combine=("mean", ("D3", "D4")), n_boot=300)
    b = accuracy_with_ci(c, [labels] * 3, combine=("mean", ("D3", "D4")), n_boot=300)
    for key in ("D0", "D3", "D4", "mean", "('D3', 'D4')"):
        assert b["value"][key] == pytest.approx(a["value"][key]) and b["seeds"][key] == pytest.approx(a["seeds"][key])
        assert b["n"][key] == a["n"][key]


def test_per_seed_strata_intervals_cover_the_truth():
    # Every item right with p = 0.3 in every seed, strata drawn per seed at random: the 95 %
    # interval of stratum A holds 0.3 in about 95 % of repeated studies (here 88-99 % of 150).
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(150):
        c = (rng.random((3, 120)) < 0.3).astype(float)
        st = [list(rng.choice(["A", "B"], size=120)) for _ in range(3)]
        lo, hi = accuracy_with_ci(c, st, n_boot=400, seed=int(rng.integers(1 << 30)))["ci95"]["A"]
        hits += lo <= 0.3 <= hi
    assert 0.88 * 150 <= hits <= 0.99 * 150


def test_per_seed_strata_need_one_row_per_seed():
    with pytest.raises(ValueError, match="one row per seed"):
        accuracy_with_ci(np.ones((2, 4)), [["a"] * 4])
    with pytest.raises(ValueError, match="per-seed strata have 2 rows"):
        difference_ci(np.ones((2, 4)), np.ones((3, 4)), [["a"] * 4] * 2)


def test_borderline_marks_an_interval_end_near_zero():
    from rankwise.analysis.stats import borderline

    assert borderline([-0.03, -0.0003]) and borderline([0.004, 0.2]) and borderline([-0.2, 0.003])
    assert not borderline([0.01, 0.2]) and not borderline([-0.3, -0.02]) and not borderline([-0.1, 0.1])
    assert not borderline([None, None]) and not borderline(None)
