"""Judging samples of the digits model: scikit-learn's digits split in halves, an SVM trained
on one half, and samples mapped to its input space (`arflow demo`, benchmarks/paper_ablation).

The training pipeline flips images horizontally at random, so the classifier is trained on the
real digits and their mirror images: it judges samples against the distribution the model was
trained on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def digit_halves(seed: int = 0):
    """scikit-learn's digits ((N, 8, 8) grey, 0..16) split into two halves stratified by class:
    (x_train, x_test, y_train, y_test). The same `seed` gives the same split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    return train_test_split(
        digits.images, digits.target, test_size=0.5, random_state=seed, stratify=digits.target
    )


def digit_classifier(seed: int = 0):
    """SVM on half of scikit-learn's digits (+ mirror images); returns (classifier, held-out accuracy)."""
    from sklearn.svm import SVC

    x_train, x_test, y_train, y_test = digit_halves(seed)
    x_train = np.concatenate([x_train, x_train[:, :, ::-1]])
    y_train = np.concatenate([y_train, y_train])
    x_test = np.concatenate([x_test, x_test[:, :, ::-1]])
    y_test = np.concatenate([y_test, y_test])
    clf = SVC(gamma=0.001, C=10.0).fit(x_train.reshape(len(x_train), -1), y_train)
    return clf, float(clf.score(x_test.reshape(len(x_test), -1), y_test))


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, 64) on scikit-learn's scale: 8x8 grey, values 0..16."""
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-1] != 8:
        grey = F.interpolate(grey, size=(8, 8), mode="area")
    return ((grey.clamp(-1, 1) + 1) * 8).flatten(1).numpy()
