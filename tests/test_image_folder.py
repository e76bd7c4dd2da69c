"""Folders of image files (the ImageFolder layout): load_image_folder and --data FOLDER."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import featlearn.datasets as datasets
from featlearn.cli import main
from featlearn.datasets import DatasetError, image_folder_splits, load_image_folder


def write_image(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def make_folder(root, classes=("cat", "dog", "frog"), n=4, size=(10, 12), seed=0, jpeg_every=2):
    """``root/CLASS/i.png|jpg``: random RGB images; every ``jpeg_every``-th one a JPEG.

    Returns ``{relative path: pixels written}`` (a JPEG's pixels are only approximately those).
    """
    rng = np.random.default_rng(seed)
    written = {}
    for c in classes:
        for i in range(n):
            ext = "jpg" if jpeg_every and i % jpeg_every == 1 else "png"
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            write_image(root / c / f"{i:03d}.{ext}", arr)
            written[f"{c}/{i:03d}.{ext}"] = arr
    return written


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def test_png_and_jpeg_folder_loads_as_the_cifar_layout(tmp_path, home):
    written = make_folder(tmp_path / "f")
    data = load_image_folder(tmp_path / "f", data_home=home)
    assert data.images.shape == (12, 10, 12, 3) and data.images.dtype == np.uint8
    assert data.target_names == ["cat", "dog", "frog"]
    assert data.target.dtype == np.int64 and data.target.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    rel = [os.path.relpath(f, tmp_path / "f") for f in data.filenames]
    assert rel == sorted(written)  # class by class, files sorted
    for r, img in zip(rel, data.images):
        if r.endswith(".png"):  # lossless
            np.testing.assert_array_equal(img, written[r])
        else:  # JPEG: decoded, close to what was written on average
            assert np.abs(img.astype(int) - written[r]).mean() < 60
    assert data.skipped == []


def test_hidden_files_and_files_at_the_top_are_ignored(tmp_path, home):
    make_folder(tmp_path / "f", n=2)
    (tmp_path / "f" / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / "f" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "f" / "README.txt").write_text("my dataset")
    write_image(tmp_path / "f" / "dog" / "more" / "deep.png",
                np.zeros((10, 12, 3), np.uint8))  # deeper inside a class folder: that class
    data = load_image_folder(tmp_path / "f", data_home=home)
    assert data.target_names == ["cat", "dog", "frog"]
    assert len(data.images) == 7 and data.target.tolist().count(1) == 3


def test_mixed_sizes_are_refused_naming_two_files_and_the_fix(tmp_path, home):
    make_folder(tmp_path / "f", n=2)
    write_image(tmp_path / "f" / "dog" / "big.png", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        load_image_folder(tmp_path / "f", data_home=home)
    msg = str(err.value)
    assert "cat/000.png is 10x12" in msg and "dog/big.png is 20x30" in msg
    assert "size=" in msg and "--size" in msg


@pytest.mark.parametrize("size, shape", [(8, (8, 8)), ((6, 9), (6, 9))])
def test_size_resizes_every_image(tmp_path, home, size, shape):
    make_folder(tmp_path / "f", n=2)
    write_image(tmp_path / "f" / "dog" / "big.png", np.full((20, 30, 3), 200, np.uint8))
    data = load_image_folder(tmp_path / "f", size=size, data_home=home)
    assert data.images.shape == (7, *shape, 3)
    big = list(data.filenames).index(str(tmp_path / "f" / "dog" / "big.png"))
    assert (data.images[big] == 200).all()  # a flat image stays flat when resized


@pytest.mark.parametrize("size", [0, -3, (4,), (4, 0), "32", 2.5, True])
def test_bad_size_is_a_value_error(tmp_path, home, size):
    make_folder(tmp_path / "f", n=1)
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_image_folder(tmp_path / "f", size=size, data_home=home)


def corrupt(root):
    """A truncated PNG and a text file among the images."""
    good = write_image(root / "cat" / "zz_truncated.png",
                       np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8))
    good.write_bytes(good.read_bytes()[:60])
    (root / "dog" / "notes.txt").write_text("not an image")
    return "cat/zz_truncated.png", "dog/notes.txt"


def test_an_unreadable_file_is_an_error_naming_it(tmp_path, home):
    make_folder(tmp_path / "f", n=2)
    (tmp_path / "f" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError) as err:
        load_image_folder(tmp_path / "f", data_home=home)
    msg = str(err.value)
    assert str(tmp_path / "f" / "dog" / "notes.txt") in msg and "not an image" in msg
    assert "skip_bad=True" in msg and "--skip-bad" in msg

    (tmp_path / "f" / "dog" / "notes.txt").unlink()
    corrupt(tmp_path / "f")
    (tmp_path / "f" / "dog" / "notes.txt").unlink()
    with pytest.raises(DatasetError, match=r"zz_truncated\.png: corrupt or truncated"):
        load_image_folder(tmp_path / "f", data_home=home)


def test_skip_bad_skips_them_and_reports_the_count(tmp_path, home, capsys):
    make_folder(tmp_path / "f", n=2)
    bad = corrupt(tmp_path / "f")
    data = load_image_folder(tmp_path / "f", skip_bad=True, data_home=home)
    assert len(data.images) == 6 and len(data.target) == 6
    assert sorted(os.path.relpath(p, tmp_path / "f") for p, _ in data.skipped) == sorted(bad)
    assert not any(f.endswith(("notes.txt", "zz_truncated.png")) for f in data.filenames)
    err = capsys.readouterr().err
    assert "skipped 2 unreadable file(s) of 8" in err
    # From the cache: the same images, and the count is reported again.
    again = load_image_folder(tmp_path / "f", skip_bad=True, data_home=home)
    np.testing.assert_array_equal(again.images, data.images)
    assert "skipped 2 unreadable file(s)" in capsys.readouterr().err


def test_nothing_readable_is_an_error(tmp_path, home):
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "x.txt").write_text("text")
    with pytest.raises(DatasetError, match="no readable images"):
        load_image_folder(tmp_path / "f", skip_bad=True, data_home=home)


def test_folders_without_classes_are_explained(tmp_path, home):
    flat = tmp_path / "flat"
    write_image(flat / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="no class sub-folders.*one sub-folder per class"):
        load_image_folder(flat, data_home=home)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        load_image_folder(tmp_path / "empty", data_home=home)
    make_folder(tmp_path / "split" / "train", n=1)
    make_folder(tmp_path / "split" / "test", n=1)
    with pytest.raises(DatasetError, match="train/ and test/ splits"):
        load_image_folder(tmp_path / "split", data_home=home)
    assert set(image_folder_splits(tmp_path / "split")) == {"train", "test"}
    assert image_folder_splits(tmp_path / "flat") is None
    with pytest.raises(OSError, match="does not exist"):
        load_image_folder(tmp_path / "missing", data_home=home)


def test_grayscale_gives_one_channel(tmp_path, home):
    written = make_folder(tmp_path / "f", n=2, jpeg_every=0)
    data = load_image_folder(tmp_path / "f", grayscale=True, data_home=home)
    assert data.images.shape == (6, 10, 12, 1)
    first = written["cat/000.png"]
    expected = np.asarray(Image.fromarray(first).convert("L"))
    np.testing.assert_array_equal(data.images[0, ..., 0], expected)
    # Grayscale, palette and RGBA files all come out RGB without it.
    write_image(tmp_path / "g" / "a" / "gray.png", np.full((5, 5), 7, np.uint8))
    Image.fromarray(np.full((5, 5, 4), 9, np.uint8)).save(tmp_path / "g" / "a" / "rgba.png")
    Image.fromarray(np.full((5, 5, 3), 3, np.uint8)).convert("P").save(tmp_path / "g" / "a" / "p.png")
    rgb = load_image_folder(tmp_path / "g", data_home=home)
    assert rgb.images.shape == (3, 5, 5, 3)
    assert rgb.images[0].max() == 7 and rgb.images[2].max() == 9


def test_the_cache_is_used_and_a_changed_folder_invalidates_it(tmp_path, home, monkeypatch):
    make_folder(tmp_path / "f", n=2, jpeg_every=0)
    first = load_image_folder(tmp_path / "f", data_home=home)
    assert len(list(home.glob("imagefolder-*.npz"))) == 1

    calls = []
    decode = datasets._decode_folder
    monkeypatch.setattr(datasets, "_decode_folder",
                        lambda *a, **k: calls.append(1) or decode(*a, **k))
    cached = load_image_folder(tmp_path / "f", data_home=home)
    assert calls == [] and np.array_equal(cached.images, first.images)
    assert cached.target_names == first.target_names
    assert list(cached.filenames) == list(first.filenames)

    # Replace one image's pixels (same name and size): its mtime changes, the cache does not hold.
    target = tmp_path / "f" / "dog" / "001.png"
    write_image(target, np.full((10, 12, 3), 123, np.uint8))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_image_folder(tmp_path / "f", data_home=home)
    assert calls == [1]
    i = list(changed.filenames).index(str(target))
    assert (changed.images[i] == 123).all() and not (first.images[i] == 123).all()

    # A new file, and other options, are new keys too.
    write_image(tmp_path / "f" / "frog" / "new.png", np.zeros((10, 12, 3), np.uint8))
    assert len(load_image_folder(tmp_path / "f", data_home=home).images) == 7
    assert load_image_folder(tmp_path / "f", grayscale=True, data_home=home).images.shape[-1] == 1
    assert calls == [1, 1, 1]

    # A damaged cache file is rebuilt, not fatal.
    for f in home.glob("imagefolder-*.npz"):
        f.write_bytes(b"garbage")
    assert len(load_image_folder(tmp_path / "f", data_home=home).images) == 7


def test_parallel_decoding_gives_the_same_arrays(tmp_path, home):
    make_folder(tmp_path / "f", n=3)
    one = load_image_folder(tmp_path / "f", data_home=home)
    two = load_image_folder(tmp_path / "f", n_jobs=2, data_home=tmp_path / "home2")
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.target, two.target)


# -- the command line ------------------------------------------------------------------------

TINY = {"n_centroids": 8, "classifier": "svm", "device": "cpu", "encoder__patch_size": 3,
        "encoder__n_patches": 300, "encoder__kmeans__max_iter": 5, "classifier__max_iter": 2}


@pytest.fixture
def split_folder(tmp_path):
    """``data/train`` and ``data/test``, three classes each, and a tiny configuration."""
    make_folder(tmp_path / "data" / "train", n=6, seed=1)
    make_folder(tmp_path / "data" / "test", n=3, seed=2)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"name": "tiny", "params": TINY}))
    return tmp_path / "data", config


def cli(*args):
    return main([*map(str, args), "-q"])


def one_error_line(capsys, cmd):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"featlearn {cmd}: error: ")
    return err


def test_cli_fits_on_a_folder_and_extracts_its_features(split_folder, tmp_path, capsys):
    from featlearn.persistence import encoder_of, load_model

    data, config = split_folder
    home = tmp_path / "home"
    model = tmp_path / "model.npz"
    assert cli("fit", config, "--data", data, "--out", model, "--with-classifier",
               "--data-home", home) == 0
    assert "on 18 images" in capsys.readouterr().out
    pipe = load_model(model)
    assert list(pipe.classes_) == [0, 1, 2]

    out = tmp_path / "test_features.npy"
    assert cli("extract", "--model", model, "--data", data, "--split", "test", "--out", out,
               "--data-home", home) == 0
    test = load_image_folder(data / "test", data_home=home)
    features = np.load(out)
    assert features.shape == (9, encoder_of(pipe).n_features_out_)
    np.testing.assert_allclose(features, encoder_of(pipe).transform(test.images), rtol=1e-5,
                               atol=1e-5)
    # A single image folder (no splits) is used whole; --split does not apply.
    single = tmp_path / "single.npy"
    assert cli("extract", "--model", model, "--data", data / "test", "--out", single,
               "--data-home", home) == 0
    np.testing.assert_array_equal(np.load(single), features)


def test_cli_skip_bad_and_size(split_folder, tmp_path, capsys):
    data, config = split_folder
    (data / "train" / "dog" / "notes.txt").write_text("not an image")
    model = tmp_path / "m.npz"
    assert cli("fit", config, "--data", data, "--out", model, "--data-home", tmp_path / "h") == 1
    err = one_error_line(capsys, "fit")
    assert "notes.txt: not an image" in err and "--skip-bad" in err
    assert not model.exists()
    assert cli("fit", config, "--data", data, "--out", model, "--skip-bad",
               "--data-home", tmp_path / "h") == 0
    assert "skipped 1 unreadable file(s) of 19" in capsys.readouterr().err
    assert model.exists()

    write_image(data / "test" / "cat" / "big.jpg", np.zeros((30, 40, 3), np.uint8))
    out = tmp_path / "f.npy"
    assert cli("extract", "--model", model, "--data", data, "--split", "test", "--out", out,
               "--data-home", tmp_path / "h") == 1
    err = one_error_line(capsys, "extract")
    assert "big.jpg is 30x40" in err and "--size" in err
    assert cli("extract", "--model", model, "--data", data, "--split", "test", "--out", out,
               "--size", "10x12", "--data-home", tmp_path / "h") == 0
    assert np.load(out).shape[0] == 10


def test_cli_reproduce_and_info_on_folders(split_folder, tmp_path, capsys):
    data, config = split_folder
    home = tmp_path / "home"
    res = tmp_path / "res"
    assert cli("reproduce", config, "--data", data, "--out", res, "--data-home", home) == 0
    results = json.loads((res / "results.json").read_text())
    assert results["n_train"] == 18 and results["n_test"] == 9
    assert list(results["per_class_accuracy"]) == ["cat", "dog", "frog"]
    assert (res / "confusion.png").exists()
    capsys.readouterr()
    # A single image folder has no test split: reproduce says what it needs.
    assert cli("reproduce", config, "--data", data / "train", "--out", tmp_path / "r2",
               "--data-home", home) == 1
    err = one_error_line(capsys, "reproduce")
    assert "train/ and test/" in err
    assert not (tmp_path / "r2").exists()
    assert main(["info", "--data", str(data / "train"), "--data-home", str(home),
                 "--n-patches", "500"]) == 0
    out = capsys.readouterr().out
    assert "train: (18, 10, 12, 3) uint8; cat=6, dog=6, frog=6" in out and "test:" not in out


def test_cifar_folders_still_load_as_cifar(tmp_path):
    import tarfile

    from conftest import make_cifar_archive

    archive = make_cifar_archive(tmp_path / "c.tar.gz", n=3)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    assert not datasets.is_image_folder(tmp_path / "x")
    assert not datasets.is_image_folder(tmp_path / "x" / "cifar-10-batches-py")
    assert datasets.is_image_folder(tmp_path)
    assert main(["info", "--data", str(tmp_path / "x"), "--data-home", str(tmp_path / "h"),
                 "--n-patches", "100", "-q"]) == 0


def test_n_train_on_a_folder_samples_every_class(split_folder, tmp_path, capsys):
    from featlearn.persistence import load_model

    data, config = split_folder  # train/: 6 cat, then 6 dog, then 6 frog images
    model = tmp_path / "m.npz"
    assert cli("fit", config, "--data", data, "--out", model, "--with-classifier", "--n-train",
               "9", "--data-home", tmp_path / "h") == 0
    assert list(load_model(model).classes_) == [0, 1, 2]  # not the first 9 files: 6 cats, 3 dogs
    res = tmp_path / "res"
    assert cli("reproduce", config, "--data", data, "--out", res, "--n-train", "9", "--n-test",
               "6", "--data-home", tmp_path / "h") == 0
    confusion = np.asarray(json.loads((res / "results.json").read_text())["confusion_matrix"])
    assert confusion.sum() == 6 and (confusion.sum(1) > 0).sum() >= 2
