"""Long-tail samplers: determinism, exact sharding, and label histograms against each strategy's class frequencies."""
import math

import numpy as np
import pytest

from fastlivt.data.sampling import LongTailSampler

C = 10


def _long_tail_labels(n_max=1500, imbalance=100.0, seed=0):
    counts = [int(n_max * (1 / imbalance) ** (c / (C - 1))) for c in range(C)]
    labels = np.repeat(np.arange(C), counts)
    return np.random.default_rng(seed).permutation(labels), np.asarray(counts)


def _chi2_quantile(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at the normal quantile z (3.719 -> p = 1e-4)."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def _assert_histogram_matches(labels_drawn: np.ndarray, expected_p: np.ndarray):
    n = labels_drawn.size
    observed = np.bincount(labels_drawn, minlength=C).astype(np.float64)
    expected = n * expected_p
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_quantile(C - 1), f"chi2={chi2:.1f} observed={observed} expected={expected.round(1)}"


def test_instance_is_a_permutation_deterministic_per_seed_and_epoch():
    labels, _ = _long_tail_labels()
    s = LongTailSampler(labels, C, "instance", seed=3)
    e0, e1 = s.indices(0), s.indices(1)
    assert np.array_equal(np.sort(e0), np.arange(labels.size))
    assert np.array_equal(np.sort(e1), np.arange(labels.size))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e0, LongTailSampler(labels, C, "instance", seed=3).indices(0))
    assert not np.array_equal(e0, LongTailSampler(labels, C, "instance", seed=4).indices(0))


@pytest.mark.parametrize("world", [2, 3, 7])
def test_instance_sharding_disjoint_and_covering(world):
    labels, _ = _long_tail_labels()
    n = labels.size
    s = LongTailSampler(labels, C, "instance", seed=0)
    parts = [s.indices(5, r, world) for r in range(world)]
    per_rank = math.ceil(n / world)
    assert all(p.size == per_rank for p in parts)
    joined = np.concatenate(parts)
    assert set(joined.tolist()) == set(range(n))  # covers the epoch
    pad = per_rank * world - n
    # disjoint up to the documented wrap-around padding: exactly `pad` indices are read twice
    assert joined.size - np.unique(joined).size == pad
    if n % world == 0:
        assert pad == 0


def test_sharding_of_a_divisible_epoch_is_exactly_disjoint():
    labels = np.arange(12) % 3
    s = LongTailSampler(labels, 3, "instance", seed=1)
    a, b = s.indices(2, 0, 2), s.indices(2, 1, 2)
    assert len(set(a) & set(b)) == 0 and sorted(np.concatenate([a, b])) == list(range(12))


@pytest.mark.parametrize("strategy", ["instance", "class_balanced", "square_root"])
def test_label_histogram_matches_strategy(strategy):
    labels, counts = _long_tail_labels()
    expected = {
        "instance": counts / counts.sum(),
        "class_balanced": np.full(C, 1.0 / C),
        "square_root": np.sqrt(counts) / np.sqrt(counts).sum(),
    }[strategy]
    s = LongTailSampler(labels, C, strategy, seed=0)
    drawn = np.concatenate([labels[s.indices(e)] for e in range(4)])
    assert drawn.size == 4 * labels.size
    if strategy == "instance":  # exact, not just within sampling error
        assert np.array_equal(np.bincount(drawn, minlength=C), 4 * counts)
    _assert_histogram_matches(drawn, expected)


def test_balanced_sampling_draws_uniformly_inside_a_class():
    labels, counts = _long_tail_labels()
    s = LongTailSampler(labels, C, "class_balanced", seed=0)
    drawn = np.concatenate([s.indices(e) for e in range(6)])
    tail = np.flatnonzero(labels == C - 1)  # 15 samples, each should be drawn ~ 6 * N / C / 15 times
    hits = np.array([(drawn == i).sum() for i in tail], dtype=np.float64)
    expected = drawn.size / C / tail.size
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_quantile(tail.size - 1), hits


def test_progressive_moves_from_instance_to_balanced():
    labels, counts = _long_tail_labels()
    epochs = 5
    s = LongTailSampler(labels, C, "progressive", seed=0, total_epochs=epochs)
    natural, balanced = counts / counts.sum(), np.full(C, 1.0 / C)
    for e in range(epochs):
        a = e / (epochs - 1)
        np.testing.assert_allclose(s.class_probs(e), (1 - a) * natural + a * balanced, rtol=1e-12)
    _assert_histogram_matches(labels[np.concatenate([s.indices(0, r, 2) for r in range(2)])], natural)
    _assert_histogram_matches(labels[np.concatenate([s.indices(epochs - 1), s.indices(epochs + 3)])], balanced)


def test_sampled_strategies_give_equal_lengths_per_rank_and_same_global_order():
    labels, _ = _long_tail_labels()
    s = LongTailSampler(labels, C, "square_root", seed=9)
    full = s.epoch_order(1)
    world = 4
    parts = [s.indices(1, r, world) for r in range(world)]
    assert len({p.size for p in parts}) == 1
    padded = np.resize(full, parts[0].size * world)
    for r in range(world):
        assert np.array_equal(parts[r], padded[r::world])


def test_empty_class_is_never_drawn():
    labels = np.array([0] * 50 + [2] * 5)
    for strategy in ("class_balanced", "square_root"):
        s = LongTailSampler(labels, 3, strategy, seed=0)
        assert s.class_probs()[1] == 0.0
        assert 1 not in set(labels[s.indices(0)].tolist())


def test_sequential_order_for_evaluation():
    labels = np.arange(10) % 2
    s = LongTailSampler(labels, 2, "instance", shuffle=False)
    assert s.indices(7).tolist() == list(range(10))
    assert s.indices(0, 1, 3).tolist() == [1, 4, 7, 0]  # wrapped padding, like DistributedSampler


def test_bad_arguments_are_clear_errors():
    labels = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="unknown strategy"):
        LongTailSampler(labels, 2, "oversample")
    with pytest.raises(ValueError, match="total number of epochs"):
        LongTailSampler(labels, 2, "progressive")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        LongTailSampler(np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="rank"):
        LongTailSampler(labels, 2).indices(0, 2, 2)


@pytest.mark.parametrize("strategy", ["instance", "class_balanced", "square_root", "progressive"])
@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (4, 3), (3, 2)])
def test_resume_on_another_world_reads_the_rest_of_the_plan(strategy, old, new):
    """Interrupted after k batches on `old` ranks, continued on `new`: the epoch's positions are read exactly once."""
    labels, _ = _long_tail_labels(n_max=300)
    s = LongTailSampler(labels, C, strategy, seed=5, total_epochs=6)
    batch, epoch = 4, 3
    per_rank = s.per_rank(old) // batch * batch  # whole batches (drop_last)
    end = per_rank * old
    consumed = 5 * batch * old  # 5 batches on every old rank
    before = [s.indices(epoch, r, old)[: consumed // old] for r in range(old)]
    after = [s.indices(epoch, r, new, consumed, end) for r in range(new)]
    positions = np.resize(s.epoch_order(epoch), end)  # the epoch's plan (wrapped past N like the sharded plan)
    read = np.sort(np.concatenate(before + after))
    pad = -(-(end - consumed) // new) * new - (end - consumed)  # repeats that fill the new ranks evenly
    assert pad < new and {len(a) for a in after} == {(end - consumed + pad) // new}
    if pad == 0:
        assert np.array_equal(read, np.sort(positions))
    else:  # the padding repeats the first positions of the rest, nothing else is added or lost
        extra = positions[consumed:consumed + pad]
        assert np.array_equal(read, np.sort(np.concatenate([positions, extra])))
    if strategy == "instance" and end == s.num_samples:
        assert np.unique(np.concatenate(before + after)[: end]).size == end
    # the default (start=0, stop=None) is today's sharding, unchanged
    assert np.array_equal(s.indices(epoch, 1 % old, old), s.indices(epoch, 1 % old, old, 0, s.per_rank(old) * old))


def test_loader_plan_after_seek_on_another_world(tmp_path):
    """EpochLoader.plan with seek=(consumed, end): the ranks of the new world split the rest of the epoch's plan."""
    from engine_doubles import write_manifest
    from fastlivt.config import TrainConfig
    from fastlivt.data.base import EpochLoader

    labels, _ = _long_tail_labels(n_max=60)
    write_manifest(tmp_path / "train", labels, C)
    cfg = TrainConfig()
    cfg.data.train, cfg.data.batch_size, cfg.data.sampler, cfg.run.epochs = str(tmp_path / "train"), 4, "square_root", 3

    def loader(rank, world):
        return EpochLoader(cfg, "train", "pretrain", device="cpu", rank=rank, world=world)

    old = [loader(r, 2) for r in range(2)]
    end = len(old[0]) * 4 * 2
    consumed = 3 * 4 * 2  # 3 batches on each of 2 ranks
    before = [lo.plan(1)[: 3 * 4] for lo in old]
    new = [loader(r, 3) for r in range(3)]
    after = [lo.plan(1, seek=(consumed, end)) for lo in new]
    assert {a.size for a in after} == {(end - consumed) // 3 // 4 * 4}  # whole batches, the same on every rank
    read = np.concatenate(before + after)
    kept = consumed + sum(a.size for a in after)
    assert np.array_equal(np.sort(read), np.sort(np.resize(old[0].sampler.epoch_order(1), kept)))
    # a seek to a batch boundary of an epoch of whole batches: that epoch's plan less its first batches
    assert np.array_equal(old[1].plan(1, seek=(2 * 4 * 2, end)), old[1].plan(1)[2 * 4:])
