"""featlearn: the Coates-Ng single-layer unsupervised feature pipeline as scikit-learn estimators.

Stages, in data-flow order (one module each):

=========================  ===============================  ================================
module                     public names                     stage
=========================  ===============================  ================================
``featlearn.datasets``     ``fetch_cifar10``,               data
                           ``load_image_folder``
``featlearn.patches``      ``RandomPatchExtractor``         random patches, patch layout
``featlearn.preprocessing````PatchNormalizer``,             contrast normalization, whitening,
                           ``ZCAWhitening``,                power normalization of features
                           ``PowerNormalizer``
``featlearn.kmeans``       ``KMeans``, ``MiniBatchKMeans``  dictionary (torch, CPU or GPU)
``featlearn.dictionary``   ``RandomPatchDictionary``        dictionary of random patches
``featlearn.encoding``     ``PatchEncoder``,                dense encoding and pooling
                           ``ScaleWarning``
``featlearn.classifier``   ``TorchMLPClassifier``,          MLP / L2-SVM, convolutional head
                           ``TorchConvClassifier``,         on spatial maps (torch), seed
                           ``SeedEnsembleClassifier``       ensembles of either
``featlearn.streaming``    ``StreamingConvClassifier``      encoder + conv head trained on
                                                            images encoded per batch
``featlearn.pipeline``     ``make_coates_pipeline``         composition
``featlearn.extraction``   ``extract_features``             cached, resumable extraction
``featlearn.persistence``  ``save_model``, ``load_model``   fitted models on disk
=========================  ===============================  ================================

Names are imported lazily, so ``import featlearn`` (and the ``featlearn`` command) stays fast and
torch is only loaded by the stages that need it.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "fetch_cifar10": "datasets",
    "load_image_folder": "datasets",
    "RandomPatchExtractor": "patches",
    "PatchNormalizer": "preprocessing",
    "ZCAWhitening": "preprocessing",
    "PowerNormalizer": "preprocessing",
    "RandomPatchDictionary": "dictionary",
    "KMeans": "kmeans",
    "MiniBatchKMeans": "kmeans",
    "PatchEncoder": "encoding",
    "ScaleWarning": "encoding",
    "TorchMLPClassifier": "classifier",
    "TorchConvClassifier": "classifier",
    "SeedEnsembleClassifier": "classifier",
    "StreamingConvClassifier": "streaming",
    "make_coates_pipeline": "pipeline",
    "extract_features": "extraction",
    "save_model": "persistence",
    "load_model": "persistence",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"featlearn.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
