"""End to end on real CIFAR-10 images from the shared archive (slow; CI runs it)."""

import numpy as np
import pytest

from featlearn import make_coates_pipeline

#: Measured 58.65% (random_state=0) on two 2-core x86-64 CPUs, an AVX2 AMD EPYC and an AVX-512
#: Intel Xeon, torch 2.13 CPU build; 56.30% before the k-means fix. The floor leaves 3 points for
#: BLAS/thread-count rounding differences while staying far above chance (10%) and raw-pixel
#: linear models (37% on the full training set).
ACCURACY_FLOOR = 0.555


@pytest.mark.slow
def test_coates_pipeline_on_5000_cifar10_images(cifar10):
    X_train, y_train = cifar10.X_train[:5000], cifar10.y_train[:5000]
    X_test, y_test = cifar10.X_test[:2000], cifar10.y_test[:2000]
    pipe = make_coates_pipeline(
        200, classifier="svm", random_state=0, device="cpu",
        encoder__n_patches=50_000, encoder__kmeans__max_iter=20, classifier__max_iter=300)
    pipe.fit(X_train, y_train)
    acc = float(np.mean(pipe.predict(X_test) == y_test))
    print(f"test accuracy with 200 centroids on 5,000 training images: {acc:.4f}")
    assert acc >= ACCURACY_FLOOR
