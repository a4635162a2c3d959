"""Linear separability (paper section 4.2): how well a linear hyperplane in Z or W separates attributes.

Generate ``num`` images (default 200,000; no truncation, random noise) and keep z and w. Attribute
classifiers label every image with P(attribute). Per attribute: keep the most confident half
(largest max(p, 1 - p)), labels Y = [p > 0.5]; fit a linear SVM (scikit-learn's LinearSVC, as the official
code) on z and on w to those labels; X = the SVM's predicted class on the same samples; H(Y|X) from the
2x2 table of (X, Y) frequencies. Score = exp(sum over attributes of H(Y|X)) in nats, which equals the
official 2^(sum in bits). Reported as ls_z and ls_w; 1 is perfect separability.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .registry import (
    MetricError,
    MetricOptions,
    Progress,
    cpu_generator,
    device_generator,
    my_chunks,
    random_noise,
    register_metric,
    seed_for,
)
from .weights import resolve_weight


def get_classifier(opts: MetricOptions):
    if opts.classifier is None:
        from .classifier import load_classifier

        opts.classifier = load_classifier(resolve_weight("classifier", opts.weights.get("classifier")), opts.device)
    return opts.classifier


def conditional_entropy(x: np.ndarray, y: np.ndarray) -> float:
    """H(Y | X) in nats for binary arrays x, y (from their empirical joint distribution)."""
    x, y = np.asarray(x, bool), np.asarray(y, bool)
    p = np.array([[np.mean(~x & ~y), np.mean(~x & y)], [np.mean(x & ~y), np.mean(x & y)]])  # rows: X, cols: Y
    px = p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / px), 0.0)
    return max(0.0, float(-terms.sum()))


def svm_predict(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Fit a linear SVM and predict on the same samples; one class only -> perfectly predicted."""
    if targets.min() == targets.max():
        return targets.copy()
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC
    except ImportError:
        raise MetricError("Linear separability needs scikit-learn; install it with 'pip install scikit-learn'.") \
            from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm = LinearSVC(dual="auto", max_iter=2000)
        svm.fit(features, targets)
    return svm.predict(features).astype(targets.dtype)


def separability_from_arrays(z: np.ndarray, w: np.ndarray, probs: np.ndarray, attributes: list[str],
                             keep_fraction: float = 0.5) -> dict[str, Any]:
    """{'ls_z', 'ls_w', 'entropies': {attribute: (H_z, H_w)}} from latents, w and classifier probabilities."""
    n = probs.shape[0]
    keep = max(1, int(round(n * keep_fraction)))
    entropies: dict[str, tuple[float, float]] = {}
    for a, name in enumerate(attributes):
        p = probs[:, a].astype(np.float64)
        idx = np.argsort(-np.maximum(p, 1.0 - p), kind="stable")[:keep]
        y = (p[idx] > 0.5).astype(np.int64)
        hz = conditional_entropy(svm_predict(z[idx], y), y)
        hw = conditional_entropy(svm_predict(w[idx], y), y)
        entropies[name] = (hz, hw)
    sz = sum(h[0] for h in entropies.values())
    sw = sum(h[1] for h in entropies.values())
    return {"ls_z": float(np.exp(sz)), "ls_w": float(np.exp(sw)), "entropies": entropies}


@torch.no_grad()
def ls_partial(opts: MetricOptions, clf, num: int, tag: str = "ls") -> dict[str, Any]:
    G = opts.G
    out: dict[str, Any] = {"chunks": [], "z": [], "w": [], "probs": []}
    prog = Progress(opts, tag, num)
    for k, n in my_chunks(num, opts.batch_size, opts.rank, opts.world_size):
        s = seed_for(opts.seed, tag, k)
        z = torch.randn(n, G.latent_dim, generator=cpu_generator(s))
        ws = G.map(z.to(opts.device))  # [n, num_ws, w_dim]: copies of w, no truncation
        noise = random_noise(G, n, opts.resolution, device_generator(s + 1, opts.device), opts.device)
        images = G.synthesis(ws, opts.resolution, opts.alpha, noise=noise)
        out["chunks"].append(k)
        out["z"].append(z.numpy().astype(np.float32))
        out["w"].append(ws[:, -1].float().cpu().numpy())
        out["probs"].append(clf(images).float().cpu().numpy())
        prog.update(n)
    return out


def ls_from_partials(parts: list[dict[str, Any]], attributes: list[str], use: list[int] | None = None
                     ) -> dict[str, Any]:
    order = sorted((k, p, i) for pi, p in enumerate(parts) for i, k in enumerate(p["chunks"]))

    def cat(key):
        return np.concatenate([p[key][i] for _, p, i in order])

    probs = cat("probs")
    use = list(range(len(attributes))) if use is None else use
    return separability_from_arrays(cat("z"), cat("w"), probs[:, use], [attributes[i] for i in use])


@register_metric
def ls(opts: MetricOptions) -> dict[str, float]:
    """Separability in Z and W with the attribute classifier (default 200,000 samples, half kept)."""
    num = int(opts.num or 200_000)
    if num < 4:
        raise MetricError(f"Linear separability needs at least 4 samples, got {num}.")
    clf = get_classifier(opts)
    acc = getattr(clf, "val_accuracy", None) or {}
    use = [i for i, a in enumerate(clf.attributes) if acc.get(a, 1.0) >= opts.ls_min_accuracy]
    if not use:
        raise MetricError(f"No attribute reaches the classifier's held-out balanced accuracy threshold of "
                          f"{opts.ls_min_accuracy} (--ls-min-accuracy); lower it or train the classifier longer.")
    skipped = [a for a in clf.attributes if a not in {clf.attributes[i] for i in use}]
    opts.say(f"  ls: {len(use)} attributes" + (f" (skipped, held-out accuracy < {opts.ls_min_accuracy}: "
                                               f"{', '.join(skipped)})" if skipped else ""))
    parts = opts.gather(ls_partial(opts, clf, num))
    res = ls_from_partials(parts, clf.attributes, use)
    return {"ls_z": res["ls_z"], "ls_w": res["ls_w"]}
