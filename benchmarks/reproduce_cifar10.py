"""Reproduce a CIFAR-10 configuration end to end: the same code as ``featlearn reproduce``.

    python benchmarks/reproduce_cifar10.py coates2011-1600-svm \
        --data ../shared/datasets/cifar10-jpeg75/cifar-10-python.tar.gz \
        --md5 bd43d2a3421d9a4f9a66309ec8f698ed --out benchmarks/results/coates2011-1600-svm
"""

import sys

from featlearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
