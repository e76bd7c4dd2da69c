"""Choose a configuration's classifier settings on a validation split of the TRAINING set.

Encodes the training (and test) images once through the same joblib cache as
``featlearn reproduce --cache`` (so the final run reuses the features), holds out a stratified
5,000-image validation split of the 50,000 training images, trains each candidate classifier on
the other 45,000 and prints/writes their validation accuracies. The test features are computed
for the cache but never read here: the test set plays no part in the choice.

    python benchmarks/tune_classifier.py featlearn-best-1600 --data ARCHIVE --cache CACHE \
        --candidates '[{"classifier__max_iter": 20}, {"classifier__hidden_layer_sizes": [1024]}]'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import train_test_split

from featlearn.datasets import fetch_cifar10
from featlearn.pipeline import build_pipeline, load_config
from featlearn.reproduce import encode_cached


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--data", required=True)
    ap.add_argument("--md5", default=None)
    ap.add_argument("--data-home", default=None)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--candidates", required=True,
                    help="JSON list of classifier overrides (set_params names, classifier__...)")
    ap.add_argument("--n-val", type=int, default=5000)
    ap.add_argument("--out", default=None, help="Markdown file for the table")
    args = ap.parse_args(argv)

    config = load_config(args.config)
    data = fetch_cifar10(args.data_home, archive=args.data, md5=args.md5)
    pipe = build_pipeline(config, verbose=1)
    t0 = time.perf_counter()
    _, F, _, _, hit = encode_cached(pipe.named_steps["encoder"], data.X_train, data.X_test,
                                    args.cache, verbose=1)
    print(f"features {F.shape} in {time.perf_counter() - t0:.0f} s" + (" (cache)" if hit else ""))
    idx_fit, idx_val = train_test_split(np.arange(len(F)), test_size=args.n_val,
                                        stratify=data.y_train, random_state=0)
    rows = []
    for cand in json.loads(args.candidates):
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in cand.items()}
        trial = clone(pipe).set_params(**params)
        clf = trial.named_steps["classifier"]
        t0 = time.perf_counter()
        clf.fit(F[idx_fit], data.y_train[idx_fit])
        fit_s = time.perf_counter() - t0
        val = float(np.mean(clf.predict(F[idx_val]) == data.y_train[idx_val]))
        rows.append((cand, val, fit_s))
        print(f"{json.dumps(cand)}: validation accuracy {val:.4f} ({fit_s:.0f} s)", flush=True)

    lines = [f"Config `{config['name']}`: classifier candidates trained on 45,000 training images, "
             f"scored on a stratified {args.n_val}-image validation split of the training set "
             "(random_state=0). The test set is not used.", "",
             "| candidate (overrides) | validation accuracy | fit s |", "|---|---|---|"]
    lines += [f"| `{json.dumps(c)}` | {v:.2%} | {s:.0f} |" for c, v, s in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
