"""Statistics and determinism of the dual-sampling index plan (no images)."""

import os
import time

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lpt_jax import data  # noqa: E402
from lpt_jax.data import list_datasets  # noqa: E402
from lpt_jax.data.sampling import process_slice  # noqa: E402
from lpt_jax.errors import DataError

B, K = 256, 4


@pytest.fixture(scope="module")
def places_labels():
    _, lists = list_datasets.load_lists(list_datasets.PLACES_LT, data.default_config())
    return lists["train"][1]


def _sampler(labels, seed=0, batch=B, k=K):
    return data.DualSampler(labels, int(labels.max()) + 1, batch, seed, k)


def test_class_balanced_is_uniform_over_classes(places_labels):
    s = _sampler(places_labels)
    steps = 200  # 12,800 visits: 35 full passes over 365 classes and a partial one
    idx = np.concatenate([s.class_balanced(t) for t in range(steps)])
    per_class = np.bincount(places_labels[idx], minlength=365)
    # Tolerance: a class is visited once per pass, so counts differ by at most one visit.
    assert per_class.max() - per_class.min() <= K
    assert per_class.sum() == steps * B
    # Contrast with the data distribution it corrects (4980 vs 5 images).
    assert np.bincount(places_labels).max() / np.bincount(places_labels).min() > 900


def test_class_balanced_groups_and_cycles(places_labels):
    s = _sampler(places_labels)
    visits = []
    for t in range(120):
        labels = places_labels[s.class_balanced(t)].reshape(-1, K)
        assert np.all(labels == labels[:, :1]), "class-balanced batches come in same-class groups"
        visits.extend(labels[:, 0])
    visits = np.array(visits)
    passes = visits[: len(visits) // 365 * 365].reshape(-1, 365)
    for p in passes:  # every pass visits each class exactly once ...
        assert np.array_equal(np.sort(p), np.arange(365))
    assert not np.array_equal(passes[0], passes[1])  # ... in a reshuffled order


def test_per_class_cycles_are_without_replacement(places_labels):
    s = _sampler(places_labels)
    drawn = {}
    for t in range(150):
        for i in s.class_balanced(t):
            drawn.setdefault(int(places_labels[i]), []).append(int(i))
    for c, seq in drawn.items():
        members = np.flatnonzero(places_labels == c)
        n_c = len(members)
        full = len(seq) // n_c
        for cycle in range(full):  # each full cycle is a permutation of the class
            assert sorted(seq[cycle * n_c:(cycle + 1) * n_c]) == members.tolist()
        uses = np.bincount(np.searchsorted(members, seq), minlength=n_c)
        assert uses.max() - uses.min() <= 1
        if full >= 2 and n_c > 4:
            assert seq[:n_c] != seq[n_c:2 * n_c]  # reshuffled when exhausted


def test_instance_balanced_epochs_are_permutations(places_labels):
    s = _sampler(places_labels)
    n = len(places_labels)
    steps = data.steps_per_epoch(n, B) * 2 + 10
    seq = np.concatenate([s.instance_balanced(t) for t in range(steps)])
    assert np.array_equal(np.sort(seq[:n]), np.arange(n))
    assert np.array_equal(np.sort(seq[n:2 * n]), np.arange(n))
    assert not np.array_equal(seq[:n], seq[n:2 * n])
    # Follows the data distribution: the partial third epoch is a hypergeometric draw.
    m = len(seq) - 2 * n
    counts = np.bincount(places_labels[seq[2 * n:]], minlength=365)
    p = np.bincount(places_labels, minlength=365) / n
    sd = np.sqrt(m * p * (1 - p) * (n - m) / (n - 1))
    assert np.all(np.abs(counts - m * p) <= 5 * sd + 1)


def test_same_seed_same_plan_and_o1_resume(places_labels):
    a, b, c = _sampler(places_labels, 3), _sampler(places_labels, 3), _sampler(places_labels, 4)
    seq_a = [(a.class_balanced(t), a.instance_balanced(t)) for t in range(30)]
    for t in (29, 7, 0):  # fresh sampler, out of order: no hidden state
        assert np.array_equal(b.class_balanced(t), seq_a[t][0])
        assert np.array_equal(b.instance_balanced(t), seq_a[t][1])
    assert not np.array_equal(c.class_balanced(0), seq_a[0][0])
    assert not np.array_equal(a.class_balanced(0), a.instance_balanced(0))
    start = time.perf_counter()
    far = _sampler(places_labels, 3).class_balanced(10**7)
    assert time.perf_counter() - start < 2.0  # no replay of ten million steps
    assert len(far) == B


def test_classes_with_fewer_images_than_a_group_repeat():
    labels = np.array([0] * 9 + [1, 2, 2])  # class 1 has one image, class 2 two
    s = _sampler(labels, batch=12)
    for t in range(5):
        groups = labels[s.class_balanced(t)].reshape(-1, K)
        assert np.all(groups == groups[:, :1])
    idx = s.class_balanced(0).reshape(-1, K)
    one = idx[labels[idx[:, 0]] == 1][0]
    assert np.all(one == 9)


def test_process_slices_disjoint_and_groups_intact(places_labels):
    s = _sampler(places_labels)
    cb, ib = s.class_balanced(5), s.instance_balanced(5)
    parts = [process_slice(B, p, 8, K) for p in range(8)]
    assert np.array_equal(np.concatenate([ib[sl] for sl in parts]), ib)
    assert len(set(ib.tolist())) == B  # disjoint shares within an epoch
    for sl in parts:
        g = places_labels[cb[sl]].reshape(-1, K)
        assert np.all(g == g[:, :1])
    with pytest.raises(DataError, match="divisible by 4"):
        process_slice(24, 0, 4, K)
    with pytest.raises(DataError, match="not divisible by 3"):
        process_slice(256, 0, 3, K)


# ------------------------------------------------------------------------------------------
# data.ib_sampling='independent': the release's instance-balanced batches (a freshly shuffled
# loader every step), as an option; the default stays one permutation per epoch.

def test_independent_ib_batches_cover_one_minus_one_over_e(places_labels):
    n = len(places_labels)  # 62,500
    s = data.DualSampler(places_labels, 365, B, 0, K, ib_sampling="independent")
    steps = data.steps_per_epoch(n, B)  # 245 steps: 62,720 draws, one epoch
    batches = [s.instance_balanced(t) for t in range(steps)]
    for b in batches:
        assert len(set(b.tolist())) == B  # a batch is B distinct images, like a loader's
    distinct = len(np.unique(np.concatenate(batches))) / n
    # Exact expectation: an image is in a given step's batch with probability B/N,
    # independently across steps, so it is never drawn in an epoch with (1 - B/N)^steps.
    p_missed = (1 - B / n) ** steps
    expected = 1 - p_missed  # 0.6342 here (1 - 1/e = 0.632 in the limit)
    # Tolerance: 5 sd of the binomial count of drawn images. Inclusion indicators of one
    # batch are negatively correlated (B distinct per step), so the true sd is smaller.
    sd = np.sqrt(p_missed * (1 - p_missed) / n)  # 0.0019
    assert abs(distinct - expected) <= 5 * sd
    assert 0.62 < distinct < 0.65
    # Independent steps: consecutive batches share B^2/N = 1.05 images on average
    # (Poisson, sd ~ sqrt(mean)); batches of one epoch's permutation share none.
    shared = sum(len(np.intersect1d(a, b)) for a, b in zip(batches, batches[1:]))
    mean = (steps - 1) * B * B / n  # 255.9
    assert abs(shared - mean) <= 5 * np.sqrt(mean)
    default = _sampler(places_labels)
    perm = [default.instance_balanced(t) for t in range(steps - 2)]  # within epoch 0
    assert sum(len(np.intersect1d(a, b)) for a, b in zip(perm, perm[1:])) == 0


def test_independent_ib_is_a_pure_function_of_seed_and_step(places_labels):
    a = data.DualSampler(places_labels, 365, B, 3, K, ib_sampling="independent")
    b = data.DualSampler(places_labels, 365, B, 3, K, ib_sampling="independent")
    c = data.DualSampler(places_labels, 365, B, 4, K, ib_sampling="independent")
    seq = [a.instance_balanced(t) for t in range(12)]
    for t in (11, 4, 0):  # fresh sampler, out of order: O(1) resume, bit-identical
        assert np.array_equal(b.instance_balanced(t), seq[t])
    assert not np.array_equal(c.instance_balanced(0), seq[0])
    start = time.perf_counter()
    assert len(b.instance_balanced(10**9)) == B
    assert time.perf_counter() - start < 1.0
    # The class-balanced stream does not depend on the option.
    assert np.array_equal(a.class_balanced(5), _sampler(places_labels, 3).class_balanced(5))
    # Process slicing unchanged: shares of the global batch, in process order.
    ib = a.instance_balanced(5)
    parts = [process_slice(B, p, 8, K) for p in range(8)]
    assert np.array_equal(np.concatenate([ib[sl] for sl in parts]), ib)
    # A batch larger than the data set continues with a further draw (as epochs do).
    small = data.DualSampler(np.array([0, 0, 1, 1, 1]), 2, 8, 0, 4, ib_sampling="independent")
    drawn = small.instance_balanced(0)
    assert len(drawn) == 8 and sorted(drawn[:5].tolist()) == [0, 1, 2, 3, 4]


def test_default_ib_is_the_epoch_permutation(places_labels):
    n = len(places_labels)
    s = _sampler(places_labels, seed=5)
    assert s.ib_sampling == "epoch_permutation" == data.default_config().ib_sampling
    # Epoch e's permutation from generator (seed, 3, e), away from an epoch's first batch.
    t = np.arange(300 * B, 301 * B)
    epochs, positions = np.divmod(t, n)
    assert positions.min() >= B  # this step lies inside an epoch
    expected = [np.random.default_rng([5, 3, int(e)]).permutation(n)[p]
                for e, p in zip(epochs, positions)]
    assert np.array_equal(s.instance_balanced(300), expected)
    first_epoch = np.concatenate([s.instance_balanced(k) for k in range(n // B)])
    assert len(np.unique(first_epoch)) == len(first_epoch)  # each image at most once


@pytest.mark.parametrize("n,batch", [(62500, 256), (45, 8), (12, 8), (765, 32)])
def test_no_batch_repeats_an_image_across_an_epoch_boundary(n, batch):
    """A batch that straddles two epochs takes the end of one and the start of the next;
    before, one image could be in both (Places-LT, B=256: step 244 held image 25583 twice).
    Still every image once per epoch, and a pure function of (seed, step)."""
    labels = np.arange(n) % 3
    s = data.DualSampler(labels, 3, batch, seed=0)
    if n == 62500:
        b = s.instance_balanced(244)
        assert len(set(b.tolist())) == batch, "step 244 repeats an image"
    steps = (3 * n) // batch + 2
    seq = [s.instance_balanced(t) for t in range(steps)]
    assert all(len(set(b.tolist())) == batch for b in seq)
    flat = np.concatenate(seq)
    for e in range(3):
        assert np.array_equal(np.sort(flat[e * n:(e + 1) * n]), np.arange(n)), e
    fresh = data.DualSampler(labels, 3, batch, seed=0)
    for t in (steps - 1, 1, steps // 2):  # out of order, no hidden state
        assert np.array_equal(fresh.instance_balanced(t), seq[t])


def test_ib_sampling_is_validated(tmp_path):
    from helpers import make_image_folder
    with pytest.raises(DataError, match="ib_sampling='iid'.*epoch_permutation"):
        data.DualSampler(np.array([0, 1]), 2, 4, 0, 4, ib_sampling="iid")
    cfg = data.default_config()
    cfg.name, cfg.root, cfg.ib_sampling = "image_folder", str(make_image_folder(tmp_path)), "iid"
    with pytest.raises(DataError, match=r"data.ib_sampling='iid': expected 'epoch_permutation'"):
        data.get_source(cfg)
