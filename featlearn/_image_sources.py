"""The images an extraction job reads, as a source of chunks: an array (memmaps stay on disk)
or a torch ``Dataset``/``DataLoader`` streamed one batch at a time.

Both validate through :func:`featlearn.patches.check_image_array` and keep the layout the
encoder reads; a stream is read through :func:`featlearn._torch.iter_image_batches`, twice
(:class:`StreamedImages` says why).
"""

from __future__ import annotations

import hashlib

import numpy as np

from .fingerprints import data_fingerprint
from .patches import check_image_array, is_torch_dataset

#: The layouts an extraction job passes through to the encoder, for error messages.
_LAYOUTS = "(n, H, W, C) or (n, C, H, W)"


def image_source(images):
    """:class:`StreamedImages` for a torch dataset or loader (its first pass runs here), else
    :class:`ArrayImages`."""
    if is_torch_dataset(images):
        return StreamedImages(images)
    return ArrayImages(images)


class ArrayImages:
    """Images held as an array (or memmap): sliced into chunks, hashed in blocks."""

    def __init__(self, images):
        self.filename = getattr(images, "filename", None)
        self.images = check_image_array(images, layout=_LAYOUTS)
        self.shape, self.dtype = self.images.shape, self.images.dtype
        self.first = self.images[:1]

    def fingerprint(self):
        return data_fingerprint(self.images)

    def chunks(self, size, todo):
        """``(index, images)`` of the chunks in ``todo``, in order."""
        for i in todo:
            yield i, self.images[i * size:(i + 1) * size]


class StreamedImages:
    """A torch ``Dataset``/``DataLoader`` read as consecutive chunks, one batch in memory.

    The constructor is the first pass: it validates every batch (dimensions, dtype,
    finiteness, one shape throughout), counts the images and hashes each batch, keeping the
    first image for the width probe. :meth:`chunks` is the second pass: it regroups the batches
    into chunks of the job's size and checks each batch against the first pass's hash *before*
    any of it is encoded, so a dataset that yields other images on the second pass (random
    transforms) is an error, never features of images other than those the cache key names.
    """

    def __init__(self, data):
        from ._torch import iter_image_batches

        self.data = data
        self.filename = None
        self.batch_hashes = []
        n, shape, dtype, first = 0, None, None, None
        for X in iter_image_batches(data):
            if len(X):
                X = check_image_array(X, what="the dataset's images", layout=_LAYOUTS)
            if shape is None and len(X):
                shape, dtype, first = X.shape[1:], X.dtype, np.array(X[:1])
            elif len(X) and (X.shape[1:] != shape or X.dtype != dtype):
                raise ValueError(f"the dataset's batches differ: images {shape} {dtype}, then "
                                 f"{X.shape[1:]} {X.dtype}; all images must have one size and "
                                 "dtype")
            self.batch_hashes.append(_batch_hash(X))
            n += len(X)
        if n == 0:
            raise ValueError("got an empty set of images (the dataset yielded none)")
        self.shape, self.dtype, self.first = (n, *shape), dtype, first

    def fingerprint(self):
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(("stream", self.shape, self.dtype.str)).encode())
        for b in self.batch_hashes:
            h.update(b.encode())
        return h.hexdigest()

    def chunks(self, size, todo):
        """``(index, images)`` of the chunks in ``todo``, in order (every batch is read)."""
        from ._torch import iter_image_batches

        todo = set(todo)
        pending, have, index, n_batches = [], 0, 0, 0
        for X in iter_image_batches(self.data):
            if (n_batches >= len(self.batch_hashes)
                    or _batch_hash(X) != self.batch_hashes[n_batches]):
                raise ValueError(
                    f"the dataset yielded different images on a second pass (batch "
                    f"{n_batches}): extract_features reads it twice (to key the cache, then to "
                    "encode), so it must give the same images each time (no random transforms, "
                    "no shuffling); for a one-off encoding call encoder.transform(dataset)")
            n_batches += 1
            pending.append(X)
            have += len(X)
            while have >= size:
                block = np.concatenate(pending) if len(pending) > 1 else pending[0]
                if index in todo:
                    yield index, block[:size]
                index += 1
                rest = block[size:]
                pending, have = ([rest], len(rest)) if len(rest) else ([], 0)
        if n_batches != len(self.batch_hashes):
            raise ValueError(f"the dataset yielded {n_batches} batches on a second pass, "
                             f"{len(self.batch_hashes)} on the first; it must give the same "
                             "images each time")
        if have and index in todo:
            yield index, np.concatenate(pending) if len(pending) > 1 else pending[0]


def _batch_hash(X) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(X.shape), X.dtype.str)).encode())
    h.update(np.ascontiguousarray(X).data)
    return h.hexdigest()


def mirror(images, encoder):
    """Horizontal mirror in the layout the encoder reads (W is the last axis channels-first)."""
    axis = images.ndim - 1 if getattr(encoder, "channels", "last") == "first" else 2
    return np.flip(images, axis=axis)
