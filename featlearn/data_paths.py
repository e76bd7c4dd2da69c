"""What a dataset path names, loaded: a CIFAR-10 archive (or its extracted folder), a folder of
images (one sub-folder per class) or one holding ``train/`` and ``test/`` such folders, or an
``.npy`` array of images. The command line's ``--data`` goes through here.

Image folders come in a fixed shuffled order (like CIFAR-10's), so the first N images of a
split sample every class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

from .datasets import fetch_cifar10, image_folder_splits, is_image_folder, load_image_folder


def load_dataset(path, *, data_home=None, md5=None, size=None, grayscale=False, skip_bad=False,
                 needs_test=None) -> Bunch:
    """The dataset at ``path`` as :func:`featlearn.fetch_cifar10`'s Bunch.

    A CIFAR-10 archive or folder, or a folder holding ``train/`` and ``test/`` image folders,
    each in a fixed shuffled order. A single image folder is the training split and ``X_test``
    is None, unless ``needs_test`` (words for what needs a test split, e.g. a command) makes it
    an error. ``size``, ``grayscale`` and ``skip_bad`` apply to image folders
    (:func:`featlearn.load_image_folder`).
    """
    path = Path(path).expanduser()
    if not is_image_folder(path):
        return fetch_cifar10(data_home, archive=str(path), md5=md5)
    folder = dict(size=size, grayscale=grayscale, skip_bad=skip_bad, data_home=data_home)
    splits = image_folder_splits(path)
    if splits is None:
        if needs_test:
            raise ValueError(f"{path} is not a CIFAR-10 archive, and as a folder of images it "
                             f"has no train/ and test/ splits; {needs_test} needs both: give a "
                             "folder holding train/ and test/, each with one sub-folder per "
                             "class")
        train, test = _shuffled_folder(path, **folder), None
    else:
        train = _shuffled_folder(splits["train"], **folder)
        test = _shuffled_folder(splits["test"], **folder)
        if test.target_names != train.target_names:
            raise ValueError(f"{path}: train/ and test/ have different classes "
                             f"({', '.join(train.target_names)} vs "
                             f"{', '.join(test.target_names)})")
    return Bunch(X_train=train.images, y_train=train.target,
                 X_test=None if test is None else test.images,
                 y_test=None if test is None else test.target,
                 target_names=train.target_names, archive=str(path))


def load_split(path, split="train", *, labels=False, labels_file=None, channels="last",
               shuffle=False, data_home=None, md5=None, size=None, grayscale=False,
               skip_bad=False):
    """The images of one split (``"train"`` or ``"test"``) at ``path``, and with ``labels``
    their labels; returns ``X`` or ``(X, y)``.

    An ``.npy`` is memory-mapped, never loaded (``channels="first"`` turns its 4-D images
    into a channels-last view); its labels come from the ``.npy`` file ``labels_file``. An
    image folder (or a folder of ``train/`` and ``test/`` ones) comes class by class in file
    order, or with ``shuffle`` in a fixed shuffled order; a CIFAR-10 archive in its own order.
    """
    path = Path(path).expanduser()
    if path.suffix == ".npy":
        X = np.load(path, mmap_mode="r")
        if channels == "first" and X.ndim == 4:
            X = X.transpose(0, 2, 3, 1)  # a view: the file stays memory-mapped
        if not labels:
            return X
        if labels_file is None:
            raise ValueError(f"{path} holds images only: pass --labels LABELS.npy to fit a "
                             "classifier")
        return X, np.load(labels_file)
    folder = dict(size=size, grayscale=grayscale, skip_bad=skip_bad, data_home=data_home)
    if is_image_folder(path):
        splits = image_folder_splits(path)
        root = path if splits is None else splits[split]
        data = (_shuffled_folder(root, **folder) if shuffle
                else load_image_folder(root, n_jobs=-1, **folder))
        return (data.images, data.target) if labels else data.images
    data = load_dataset(path, md5=md5, **folder)
    X = data[f"X_{split}"]
    return (X, data[f"y_{split}"]) if labels else X


def _shuffled_folder(path, **options):
    """An image folder in a fixed pseudo-random order rather than class by class."""
    data = load_image_folder(path, n_jobs=-1, **options)
    order = np.random.default_rng(0).permutation(len(data.target))
    data.images, data.target = data.images[order], data.target[order]
    data.filenames = data.filenames[order]
    return data
