"""Dual sampling as pure index functions of (seed, step).

Class-balanced stream (class-aware sampler): visits classes in a cycle that is
reshuffled every pass; each visit takes `k` consecutive images of the visited
class from that class's own cycle, reshuffled every time it is exhausted.
Global visit v is pass v // C, position v % C, so class c has had exactly v // C
earlier visits and its next image is number k * (v // C) of its own cycle
sequence: any step is computed directly, without replaying earlier ones.

Instance-balanced stream, `ib_sampling`:
  'epoch_permutation' (default): global sample t = step * B + i is position t % N of
    epoch t // N's order (uniform without replacement within an epoch: every image once per
    epoch). A batch that straddles two epochs takes the last r images of epoch e and the
    first B - r of epoch e + 1, so epoch e + 1's order is its permutation with the first
    B - r images that are not among those r moved to the front: no batch holds an image
    twice (for B <= N). The r images are the last of epoch e's permutation itself when
    N >= 2B (its own front moves cannot reach its end), so any step is still computed
    directly; smaller data sets derive them from the epoch before (memoized).
  'independent' (the release's behaviour: it builds a freshly shuffled loader every step
    and takes its first batch): each step's batch is B distinct images drawn uniformly
    from its own generator (seed, step), independent of every other step; over an
    epoch of ~N/B steps about 1 - 1/e = 63 % of the images are seen.

Every permutation is drawn from its own NumPy generator seeded by
(seed, stream, key...), so results do not depend on call order or caching.
"""

import functools

import numpy as np

from lpt_jax.data.config import FIELDS
from lpt_jax.errors import DataError

# Generator tags, one per kind of draw.
_CLASS_CYCLE, _MEMBER_CYCLE, _EPOCH, _IB_STEP = 1, 2, 3, 4


class DualSampler:
    """Index plan of both streams for global batch `global_batch`.

    Parameters
    ----------
    labels : (N,) int labels of the training split.
    num_classes : C; every class must have at least one image.
    global_batch : B images per stream and step (summed over processes).
    seed : non-negative int.
    images_per_class : k consecutive same-class images per class visit.
    ib_sampling : 'epoch_permutation' | 'independent' (see the module docstring).
    """

    def __init__(self, labels, num_classes: int, global_batch: int, seed: int,
                 images_per_class: int = FIELDS.fields["cb_images_per_class"].default,
                 ib_sampling: str = FIELDS.fields["ib_sampling"].default):
        labels = np.asarray(labels, dtype=np.int64)
        if global_batch <= 0 or global_batch % images_per_class:
            raise DataError(f"global batch {global_batch} must be a positive multiple of "
                            f"data.cb_images_per_class={images_per_class}")
        if seed < 0:
            raise DataError(f"seed {seed} must be non-negative")
        accepts = FIELDS.fields["ib_sampling"].accepts
        if not accepts(ib_sampling):
            raise DataError(f"data.ib_sampling={ib_sampling!r}: expected {accepts.words}")
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_classes)
        if counts.size != num_classes or np.any(counts == 0):
            raise DataError("every class needs at least one training image and labels in [0, C)")
        starts = np.concatenate([[0], np.cumsum(counts)])
        self.members = [order[starts[c]:starts[c + 1]] for c in range(num_classes)]
        self.num_classes = num_classes
        self.num_examples = len(labels)
        self.global_batch = global_batch
        self.images_per_class = images_per_class
        self.seed = int(seed)
        self.ib_sampling = ib_sampling
        self._class_cycle = functools.lru_cache(maxsize=8)(self._class_cycle_uncached)
        self._member_cycle = functools.lru_cache(maxsize=2 * num_classes + 64)(
            self._member_cycle_uncached)
        self._epoch_perm = functools.lru_cache(maxsize=3)(self._epoch_perm_uncached)
        self._epoch_order = functools.lru_cache(maxsize=3)(self._epoch_order_uncached)

    def _perm(self, n: int, *key: int) -> np.ndarray:
        return np.random.default_rng([self.seed, *key]).permutation(n)

    def _class_cycle_uncached(self, pass_index: int) -> np.ndarray:
        return self._perm(self.num_classes, _CLASS_CYCLE, pass_index)

    def _member_cycle_uncached(self, c: int, cycle: int) -> np.ndarray:
        members = self.members[c]
        return members[self._perm(len(members), _MEMBER_CYCLE, c, cycle)]

    def _epoch_perm_uncached(self, epoch: int) -> np.ndarray:
        return self._perm(self.num_examples, _EPOCH, epoch)

    def _straddle(self, epoch: int) -> int:
        """How many images of epoch `epoch` - 1 share a batch with epoch `epoch`'s first."""
        return (epoch * self.num_examples) % self.global_batch

    def _epoch_order_uncached(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation with the first B - r images not among the r that end
        the previous epoch's order (the straddling batch's earlier part) moved to the front."""
        perm, r = self._epoch_perm(epoch), self._straddle(epoch)
        if epoch == 0 or r == 0:
            return perm
        n, b = self.num_examples, self.global_batch
        previous = (self._epoch_perm(epoch - 1) if n >= 2 * b
                    else self._epoch_order(epoch - 1))[n - r:]
        front = np.flatnonzero(~np.isin(perm, previous))[:b - r]
        rest = np.ones(n, bool)
        rest[front] = False
        return np.concatenate([perm[front], perm[rest]])

    def class_balanced(self, step: int) -> np.ndarray:
        """(B,) example indices of step `step`, in groups of k from one class."""
        k = self.images_per_class
        visits_per_step = self.global_batch // k
        out = np.empty(self.global_batch, dtype=np.int64)
        first = int(step) * visits_per_step
        for slot, v in enumerate(range(first, first + visits_per_step)):
            pass_index, position = divmod(v, self.num_classes)
            c = int(self._class_cycle(pass_index)[position])
            n_c = len(self.members[c])
            for r, j in enumerate(range(k * pass_index, k * pass_index + k)):
                cycle, pos = divmod(j, n_c)
                out[slot * k + r] = self._member_cycle(c, cycle)[pos]
        return out

    def instance_balanced(self, step: int) -> np.ndarray:
        """(B,) example indices of step `step`: uniform without replacement per epoch
        ('epoch_permutation'), or B distinct images drawn for this step alone
        ('independent')."""
        if self.ib_sampling == "independent":
            return self._independent(int(step))
        t = int(step) * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        epochs, positions = np.divmod(t, self.num_examples)
        out = np.empty(self.global_batch, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._epoch_order(int(e))[positions[sel]]
        return out

    def _independent(self, step: int) -> np.ndarray:
        """B distinct images drawn uniformly for this step alone: distributed as the first
        B of a fresh permutation, what the release's freshly shuffled loader yields (a
        batch larger than N continues with a further draw, as epochs do)."""
        n, b = self.num_examples, self.global_batch
        rng = np.random.default_rng([self.seed, _IB_STEP, step])
        parts, left = [], b
        while left > 0:
            take = min(left, n)
            parts.append(rng.choice(n, size=take, replace=False))  # O(take), not O(N)
            left -= take
        return np.concatenate(parts).astype(np.int64)


def process_slice(global_batch: int, process_index: int, process_count: int,
                  multiple_of: int = 1) -> slice:
    """Process p's contiguous share [p * B/P, (p + 1) * B/P) of a global batch."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, process_count={process_count})")
    if global_batch % process_count:
        raise DataError(
            f"global batch {global_batch} is not divisible by {process_count} processes")
    local = global_batch // process_count
    if local % multiple_of:
        raise DataError(
            f"per-process batch {global_batch}/{process_count}={local} must be divisible by "
            f"{multiple_of} (images per class in the class-balanced batch)")
    return slice(process_index * local, (process_index + 1) * local)
