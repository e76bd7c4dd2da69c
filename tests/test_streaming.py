"""StreamingConvClassifier: the conv head trained on images encoded per batch (crop + flip)."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from featlearn import PatchEncoder, StreamingConvClassifier, TorchConvClassifier
from featlearn.streaming import ImageStream
from featlearn.kmeans import MiniBatchKMeans
from featlearn.persistence import load_model, save_model


def make_images(n=96, seed=0):
    """12x12 RGB images; class 1 has a bright red square somewhere in its left half."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.integers(0, 90, (n, 12, 12, 3)).astype(np.uint8)
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, 8), rng.integers(0, 3)
        X[i, r:r + 4, c:c + 4, 0] = 230
    return X, y


def encoder(**kw):
    return PatchEncoder(**{**dict(patch_size=4, n_patches=3000, kmeans=MiniBatchKMeans(
        12, max_iter=5, random_state=0), pool_size=3, pool_stride=2, pool_op="mean",
        device="cpu", random_state=0), **kw})


def head(**kw):
    return TorchConvClassifier(**{**dict(width=8, kernel_size=2, max_iter=15, batch_size=16,
                                         learning_rate_init=0.05, device="cpu",
                                         random_state=0), **kw})


@pytest.fixture(scope="module")
def data():
    return make_images(), make_images(n=64, seed=1)


@pytest.fixture(scope="module")
def fitted(data):
    (X, y), _ = data
    return StreamingConvClassifier(encoder(), head(), crop_padding=2, random_state=0).fit(X, y)


def test_stream_without_augmentation_is_the_encoders_map(data):
    (X, _), _ = data
    enc = encoder(layout="map").fit(X)
    maps = enc.transform(X)
    stream = ImageStream(X, enc, torch.device("cpu"), n_views=2)
    rows = np.array([0, 1, 6, 7, 30, 31])  # image 0, its mirror, image 3 and its mirror ...
    got = stream.batch(rows, torch.device("cpu")).numpy()
    mirrored = enc.transform(X[:, :, ::-1])
    want = np.stack([maps[0], mirrored[0], maps[3], mirrored[3], maps[15], mirrored[15]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert stream.shape == maps.shape[1:] and stream.n_rows == 2 * len(X)


@pytest.mark.parametrize("activation", ["triangle", "nearest_fraction"])
def test_stream_encodes_as_the_encoders_transform_does(data, activation):
    # The encoder's own rule picks the kernels (on the CPU the native ones, when built), so a
    # streamed batch is the transform's map exactly, and compile=False streams eagerly.
    from featlearn import _native

    (X, _), _ = data
    enc = encoder(layout="map", activation=activation).fit(X)
    stream = ImageStream(X, enc, torch.device("cpu"))
    assert stream.kernels.compiled == _native.available()
    got = stream.batch(np.arange(10), torch.device("cpu")).numpy()
    np.testing.assert_array_equal(got, enc.transform(X[:10]))
    eager = ImageStream(X, enc.set_params(compile=False), torch.device("cpu"))
    assert not eager.kernels.compiled
    np.testing.assert_array_equal(eager.batch(np.arange(10), torch.device("cpu")).numpy(),
                                  enc.transform(X[:10]))


def test_stream_worker_threads_encode_the_single_thread_maps(data, two_threads):
    # Batches split between worker threads (a kernel each, kept for the next batch) give the
    # maps one thread gives, whichever worker takes which chunk.
    (X, _), _ = data
    enc = encoder(layout="map", batch_size=3).fit(X)
    stream = ImageStream(X, enc, torch.device("cpu"), n_views=2)
    rows = np.arange(0, 2 * len(X), 3)
    workers = [stream.batch(rows, torch.device("cpu")) for _ in range(2)]
    assert len(stream.kernels.idle) == 2  # one per worker, back in the idle list
    torch.set_num_threads(1)
    single = stream.batch(rows, torch.device("cpu"))
    for got in workers:
        assert torch.equal(got, single)


def test_crop_cuts_a_window_of_the_zero_padded_image(data):
    (X, _), _ = data
    enc = encoder().fit(X)
    stream = ImageStream(X, enc, torch.device("cpu"), crop_padding=3,
                         generator=torch.Generator().manual_seed(0))
    crops = stream._crop(X[:20])
    padded = np.pad(X[:20], ((0, 0), (3, 3), (3, 3), (0, 0)))
    offsets = set()
    for i, crop in enumerate(crops):
        found = [(dy, dx) for dy in range(7) for dx in range(7)
                 if np.array_equal(padded[i, dy:dy + 12, dx:dx + 12], crop)]
        assert found, f"crop {i} is no window of its padded image"
        offsets.add(found[0])
    assert len(offsets) > 5  # offsets are drawn per image


def test_random_flip_mirrors_about_half_the_images(data):
    (X, _), _ = data
    enc = encoder(layout="map").fit(X)
    maps, mirrored = enc.transform(X), enc.transform(X[:, :, ::-1])
    stream = ImageStream(X, enc, torch.device("cpu"), random_flip=True,
                         generator=torch.Generator().manual_seed(1))
    got = stream.batch(np.arange(len(X)), torch.device("cpu")).numpy()
    plain = np.isclose(got, maps, atol=1e-5).all(axis=(1, 2, 3))
    flipped = np.isclose(got, mirrored, atol=1e-5).all(axis=(1, 2, 3))
    assert (plain | flipped).all()
    assert 0.25 < flipped[~plain].size / len(X) < 0.75


def test_learns_and_predicts_from_images(fitted, data):
    _, (Xt, yt) = data
    assert fitted.score(Xt, yt) > 0.85
    proba = fitted.predict_proba(Xt)
    assert proba.shape == (len(Xt), 2)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    assert fitted.head_.n_iter_ == 15 and len(fitted.head_.loss_curve_) == 15
    assert fitted.n_features_in_ == 12 * 12 * 3


def test_test_flip_averages_the_mirror_views(fitted, data):
    _, (Xt, _) = data
    model = fitted.head_.model_.eval()
    enc = fitted.encoder_
    stream = ImageStream(Xt, enc, torch.device("cpu"))
    with torch.no_grad():
        a = model(stream.batch(np.arange(len(Xt)), torch.device("cpu")))
        b = model(ImageStream(Xt[:, :, ::-1], enc, torch.device("cpu")).batch(
            np.arange(len(Xt)), torch.device("cpu")))
    want = ((a + b) / 2).numpy().ravel()
    np.testing.assert_allclose(fitted.decision_function(Xt), want, rtol=1e-4, atol=1e-5)
    one = fitted.set_params(test_flip=False).decision_function(Xt)
    fitted.set_params(test_flip=True)
    np.testing.assert_allclose(one, a.numpy().ravel(), rtol=1e-4, atol=1e-5)


def test_same_random_state_same_model(data):
    (X, y), (Xt, _) = data
    kw = dict(crop_padding=2, random_state=3)
    a = StreamingConvClassifier(encoder(), head(max_iter=3), **kw).fit(X, y)
    b = StreamingConvClassifier(encoder(), head(max_iter=3), **kw).fit(X, y)
    c = StreamingConvClassifier(encoder(), head(max_iter=3), crop_padding=2,
                                random_state=4).fit(X, y)
    np.testing.assert_array_equal(a.decision_function(Xt), b.decision_function(Xt))
    assert a.head_.loss_curve_ == b.head_.loss_curve_
    assert a.head_.loss_curve_ != c.head_.loss_curve_  # other augmentations


def test_early_stopping_validates_on_plain_images(data):
    (X, y), _ = data
    clf = StreamingConvClassifier(encoder(), head(max_iter=6, early_stopping=True,
                                                  n_iter_no_change=2), random_state=0).fit(X, y)
    scores = clf.head_.validation_scores_
    assert 1 <= len(scores) <= 6 and all(0 <= s <= 1 for s in scores)


def test_pickles_and_saves_safely(fitted, data, tmp_path):
    _, (Xt, _) = data
    want = fitted.predict_proba(Xt)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fitted)).predict_proba(Xt), want)
    path = tmp_path / "model.featlearn"
    save_model(fitted, path)
    np.testing.assert_allclose(load_model(path).predict_proba(Xt), want, rtol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(encoder=encoder(flip=True)), "flip=False"),
    (dict(head=head(n_views=2)), "n_views=1"),
    (dict(encoder="zca"), "encoder"),
    (dict(crop_padding=-1), "crop_padding"),
])
def test_bad_parameters_name_the_problem(data, kw, match):
    (X, y), _ = data
    params = dict(encoder=encoder(), head=head(max_iter=1))
    params.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        StreamingConvClassifier(**params).fit(X, y)


def test_bad_input_names_the_problem(fitted, data):
    (X, y), _ = data
    with pytest.raises(ValueError, match="96 images but y has 95"):
        StreamingConvClassifier(encoder(), head(max_iter=1)).fit(X, y[:-1])
    with pytest.raises(ValueError, match="one class"):
        StreamingConvClassifier(encoder(), head(max_iter=1)).fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="fitted on 12x12"):
        fitted.predict(np.zeros((2, 10, 10, 3), np.uint8))
    with pytest.raises(NotFittedError):
        StreamingConvClassifier(encoder(), head()).predict(X)
