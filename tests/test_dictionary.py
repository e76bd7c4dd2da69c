"""RandomPatchDictionary: a dictionary of distinct random (whitened) patches, as PatchEncoder's
k-means stage."""

import pickle

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from featlearn import PatchEncoder, PatchNormalizer, RandomPatchDictionary, ZCAWhitening
from featlearn.patches import RandomPatchExtractor
from featlearn.persistence import load_model, save_model
from featlearn.pipeline import build_pipeline


@parametrize_with_checks([RandomPatchDictionary(n_clusters=3, random_state=0),
                          RandomPatchDictionary(n_clusters=2, normalize=True, random_state=0)])
def test_sklearn_contract(estimator, check):
    check(estimator)


def _rows(n=200, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_atoms_are_distinct_rows_of_the_data_and_indices_say_which():
    X = _rows()
    d = RandomPatchDictionary(n_clusters=50, random_state=0).fit(X)
    assert d.cluster_centers_.dtype == np.float32 and d.cluster_centers_.shape == (50, 6)
    np.testing.assert_array_equal(d.cluster_centers_, X[d.indices_])
    assert len(np.unique(d.indices_)) == 50 and d.n_iter_ == 0
    assert not hasattr(d, "inertia_")


def test_draw_is_uniform_and_seeded():
    X = _rows(n=20)
    counts = np.zeros(20)
    for seed in range(400):
        counts[RandomPatchDictionary(n_clusters=5, random_state=seed).fit(X).indices_] += 1
    # each row is chosen with probability 5/20: 100 expected per row; 5 sigma is about 43
    assert np.abs(counts - 100).max() < 45
    a = RandomPatchDictionary(n_clusters=5, random_state=7).fit(X)
    b = RandomPatchDictionary(n_clusters=5, random_state=7).fit(X)
    c = RandomPatchDictionary(n_clusters=5, random_state=8).fit(X)
    np.testing.assert_array_equal(a.indices_, b.indices_)
    assert not np.array_equal(a.indices_, c.indices_)


def test_equal_rows_give_one_atom():
    X = _rows(n=30)
    X[10:25] = 0.0  # flat patches: many copies of one vector (and one negative zero)
    X[12, 0] = -0.0
    d = RandomPatchDictionary(n_clusters=16, random_state=0).fit(X)
    assert len(np.unique(d.cluster_centers_, axis=0)) == 16  # 15 distinct others + one zero row
    with pytest.raises(ValueError, match="n_clusters=17 is more than the 16 distinct rows"):
        RandomPatchDictionary(n_clusters=17, random_state=0).fit(X)


def test_too_many_atoms_names_both_numbers():
    with pytest.raises(ValueError, match=r"n_clusters=11 should be <= n_samples=10"):
        RandomPatchDictionary(n_clusters=11).fit(_rows(n=10))


def test_normalize_gives_unit_atoms_and_keeps_zero_rows():
    X = _rows()
    X[3] = 0.0
    d = RandomPatchDictionary(n_clusters=200, normalize=True, random_state=0).fit(X)
    norms = np.linalg.norm(d.cluster_centers_, axis=1)
    zero = d.indices_ == 3
    np.testing.assert_allclose(norms[~zero], 1.0, rtol=1e-6)
    assert norms[zero] == 0.0
    raw = X[d.indices_[~zero]]
    np.testing.assert_allclose(d.cluster_centers_[~zero],
                               raw / np.linalg.norm(raw.astype(np.float64), axis=1)[:, None],
                               rtol=1e-6)


def test_predict_transform_score_match_naive_reference():
    X, Y = _rows(seed=1), _rows(n=50, seed=2)
    d = RandomPatchDictionary(n_clusters=20, random_state=0).fit(X)
    C = d.cluster_centers_.astype(np.float64)
    D = np.sqrt(((Y.astype(np.float64)[:, None, :] - C[None]) ** 2).sum(-1))
    np.testing.assert_allclose(d.transform(Y), D, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(d.predict(Y), D.argmin(1))
    assert d.score(Y) == pytest.approx(-(D.min(1) ** 2).sum(), rel=1e-5)
    assert d.transform(Y.astype(np.float64)).dtype == np.float64


def test_unfitted_and_wrong_width_are_errors():
    with pytest.raises(NotFittedError):
        RandomPatchDictionary().predict(_rows())
    d = RandomPatchDictionary(n_clusters=3).fit(_rows())
    with pytest.raises(ValueError, match="features"):
        d.transform(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="n_clusters"):
        RandomPatchDictionary(n_clusters=0).fit(_rows())


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randint(0, 256, size=(40, 10, 10, 3)).astype(np.uint8)


def test_as_the_encoder_dictionary_atoms_are_whitened_sampled_patches(images):
    enc = PatchEncoder(patch_size=3, n_patches=400, pooling=(2, 2), device="cpu", random_state=0,
                       kmeans=RandomPatchDictionary(n_clusters=16, random_state=1)).fit(images)
    # the encoder's own sampling, normalization and whitening, reproduced by hand
    rng = np.random.RandomState(0)
    patch_seed = rng.randint(np.iinfo(np.int32).max)
    P = RandomPatchExtractor(3, 400, random_state=patch_seed).fit_transform(images)
    W = ZCAWhitening().fit(PatchNormalizer().fit_transform(P))
    white = W.transform(PatchNormalizer().fit_transform(P))
    ref = RandomPatchDictionary(n_clusters=16, random_state=1).fit(white)
    np.testing.assert_array_equal(enc.kmeans_.cluster_centers_, ref.cluster_centers_)
    assert enc.n_clusters_ == 16
    feats = enc.transform(images[:5])
    assert feats.shape == (5, 4 * 16) and np.isfinite(feats).all()


def test_encoder_round_trip_with_random_dictionary(images, tmp_path):
    enc = PatchEncoder(patch_size=3, n_patches=300, device="cpu", random_state=0,
                       kmeans=RandomPatchDictionary(n_clusters=8, random_state=0)).fit(images)
    path = tmp_path / "enc.npz"
    save_model(enc, path)
    back = load_model(path)
    assert isinstance(back.kmeans_, RandomPatchDictionary)
    np.testing.assert_array_equal(back.transform(images[:4]), enc.transform(images[:4]))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(enc)).transform(images[:4]),
                                  enc.transform(images[:4]))


def test_a_configuration_may_name_it_and_set_its_size_by_the_kmeans_path():
    config = {"name": "t", "params": {
        "classifier": "svm", "encoder__kmeans__n_clusters": 12,
        "encoder__kmeans": {"class": "RandomPatchDictionary", "params": {"random_state": 3}}}}
    pipe = build_pipeline(config, device="cpu")
    km = pipe.named_steps["encoder"].kmeans
    assert isinstance(km, RandomPatchDictionary)
    assert km.n_clusters == 12 and km.random_state == 3
