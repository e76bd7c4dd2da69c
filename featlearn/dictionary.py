"""A dictionary of random patches: the k-means stage replaced by a random choice of patches.

Thiry, Arbel, Belilovsky & Oyallon (ICLR 2021) encode images against randomly chosen whitened
patches and match or beat k-means dictionaries of the same size (Coates & Ng, ICML 2011, had
found random patches nearly as good). :class:`RandomPatchDictionary` is that stage with the
k-means interface :class:`featlearn.PatchEncoder` reads (``cluster_centers_``), so it is passed
as ``PatchEncoder(kmeans=RandomPatchDictionary(...))``.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from ._kmeans_solvers import nearest_centroid, pairwise_distances
from .patches import check_finite_float32

#: Candidate rows examined per step while looking for distinct ones.
_CANDIDATE_BLOCK = 4096


class RandomPatchDictionary(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Dictionary of ``n_clusters`` distinct rows of the training patches, drawn at random.

    Inside :class:`featlearn.PatchEncoder` the rows it is fitted on are the sampled patches
    after contrast normalization and whitening, so the atoms are random *whitened* patches: the
    dictionary of Thiry et al. (ICLR 2021). Their code (louity/patches, ``utils.py``,
    ``select_patches_randomly``) draws patch positions (image, row, column) uniformly over the
    whole training set, keeps distinct positions only, and whitens the chosen raw patches
    afterwards; whitening acts row by row, so choosing among rows that are already whitened is
    the same thing. Here rows are kept distinct by *value* (which implies distinct positions,
    and also drops the copies of flat patches that normalize to the same vector: equal atoms
    only repeat a feature). Their k-nearest-neighbour encoding (``kneighbors.py``) uses the
    whitened patches as they are, with Euclidean distances; their cosine encoding
    (``radiusneighbors.py``) scales each whitened patch to unit norm, which is
    ``normalize=True``.

    The parameter is named ``n_clusters``, as in :class:`featlearn.KMeans` and scikit-learn's
    k-means, so the two are interchangeable wherever the dictionary size is set or read by name
    (a configuration's ``encoder__kmeans__n_clusters``, ``featlearn reproduce``'s report, a
    grid search over ``encoder__kmeans``); ``n_components``, the name of scikit-learn's
    dictionary learners, would break each of those for no gain in meaning.
    Fitting is one random draw: no iterations, no objective. ``inertia_`` (the k-means
    objective) is deliberately not computed: it would cost a full pass of distance products
    over the training rows, as much as a k-means iteration, for a number nothing uses; call
    ``-score(X)`` when you want it.

    Parameters
    ----------
    n_clusters : int, default=2048
        Number of atoms (rows of ``cluster_centers_``).
    normalize : bool, default=False
        Scale every atom to unit Euclidean norm (all-zero rows stay zero).
    random_state : int, RandomState instance or None, default=None
        Seeds the draw. Within ``PatchEncoder`` a dictionary keeps its own ``random_state``.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features), float32
        The atoms, in the order they were drawn.
    indices_ : ndarray of shape (n_clusters,), int64
        Row of the training data each atom was taken from.
    n_iter_ : int
        Always 0 (kept for the k-means interface).
    n_features_in_ : int

    See Also
    --------
    featlearn.KMeans : the paper's dictionary, learned by k-means.

    Examples
    --------
    >>> import numpy as np
    >>> from featlearn import RandomPatchDictionary
    >>> X = np.arange(20, dtype=np.float32).reshape(10, 2)
    >>> d = RandomPatchDictionary(n_clusters=3, random_state=0).fit(X)
    >>> d.cluster_centers_.shape, bool(np.isin(d.cluster_centers_, X).all())
    ((3, 2), True)
    >>> d.predict(X[d.indices_]).tolist()
    [0, 1, 2]
    """

    _parameter_constraints = {
        "n_clusters": [Interval(numbers.Integral, 1, None, closed="left")],
        "normalize": ["boolean"],
        "random_state": ["random_state"],
    }

    def __init__(self, n_clusters=2048, normalize=False, random_state=None):
        self.n_clusters = n_clusters
        self.normalize = normalize
        self.random_state = random_state

    def fit(self, X, y=None):
        """Draw ``n_clusters`` distinct rows of ``X`` uniformly at random.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self
        """
        self._validate_params()
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        check_finite_float32(X, "X")
        rng = check_random_state(self.random_state)
        idx = _distinct_rows(X, self.n_clusters, rng)
        centers = np.array(X[idx], dtype=np.float32)
        if self.normalize:
            norms = np.sqrt(np.einsum("ij,ij->i", centers, centers, dtype=np.float64))
            centers /= np.where(norms > 0, norms, 1.0).astype(np.float32)[:, None]
        self.cluster_centers_ = centers
        self.indices_ = idx.astype(np.int64)
        self.n_iter_ = 0
        self._n_features_out = self.n_clusters
        return self

    def predict(self, X):
        """Index of the nearest atom (Euclidean) for each row of ``X``.

        Returns
        -------
        labels : ndarray of shape (n_samples,), int64
        """
        X = self._check_rows(X)
        labels, _ = nearest_centroid(X, self._centers_like(X))
        return labels.numpy()

    def transform(self, X):
        """Euclidean distances from each row of ``X`` to every atom.

        Returns
        -------
        distances : ndarray of shape (n_samples, n_clusters)
            float64 for float64 input, else float32.
        """
        X = self._check_rows(X)
        return pairwise_distances(X, self._centers_like(X)).numpy()

    def score(self, X, y=None):
        """Minus the sum of squared distances of the rows of ``X`` to their nearest atom."""
        X = self._check_rows(X)
        _, mind = nearest_centroid(X, self._centers_like(X))
        return -float(mind.sum(dtype=torch.float64))

    def _check_rows(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        check_finite_float32(X, "X")
        return torch.from_numpy(np.ascontiguousarray(X))

    def _centers_like(self, X):
        return torch.from_numpy(self.cluster_centers_).to(dtype=X.dtype)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def _distinct_rows(X: np.ndarray, k: int, rng) -> np.ndarray:
    """Indices of ``k`` rows of ``X`` with distinct values, uniformly at random (in draw order).

    Walks a random permutation of the rows and keeps each row whose value was not kept before,
    so the result is a uniform draw among the distinct values' first occurrences in that
    order. Rows are compared as float32 bytes (with -0.0 read as 0.0).
    """
    n = X.shape[0]
    if k > n:
        raise ValueError(f"n_clusters={k} should be <= n_samples={n}: the dictionary takes "
                         "distinct rows of X")
    order = rng.permutation(n)
    seen, kept = set(), []
    for s in range(0, n, _CANDIDATE_BLOCK):
        block = order[s:s + _CANDIDATE_BLOCK]
        rows = np.ascontiguousarray(X[block], dtype=np.float32) + np.float32(0.0)
        for i, row in zip(block, rows):
            key = row.tobytes()
            if key not in seen:
                seen.add(key)
                kept.append(i)
                if len(kept) == k:
                    return np.asarray(kept, dtype=np.int64)
    raise ValueError(f"n_clusters={k} is more than the {len(kept)} distinct rows of X")
