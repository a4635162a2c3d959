"""Feature statistics that combine exactly across workers, the Fréchet distance, and the stats cache.

``FeatureStats`` keeps (count, sum, sum of outer products) in float64, so the statistics of a set are the
sum of the statistics of its slices whatever the split. Mean and covariance follow ``np.cov`` (unbiased,
divisor n - 1), as the official FID code does.

Fréchet distance between N(mu1, S1) and N(mu2, S2):
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a
symmetric PSD matrix with the same eigenvalues as S1 S2: two symmetric eigendecompositions in float64,
no complex arithmetic and no dependency on scipy.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from .. import storage

CACHE_VERSION = 1


class FeatureStats:
    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(self.dim, np.float64)
        self.outer = np.zeros((self.dim, self.dim), np.float64)

    def append(self, features) -> None:
        x = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {list(x.shape)}")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    @staticmethod
    def merge(parts: list[FeatureStats]) -> FeatureStats:
        out = FeatureStats(parts[0].dim)
        for p in parts:
            out.count += p.count
            out.sum += p.sum
            out.outer += p.outer
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        mu = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (cov + cov.T) / 2


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r1 = _sqrt_psd((s1 + s1.T) / 2)
    m = r1 @ ((s2 + s2.T) / 2) @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------------
# Cache of real-image statistics: <cache_dir>/fid-reals-<key>.npz, written to a temporary name and renamed.
# The file holds its own key and a digest of its arrays; anything unreadable or inconsistent is rebuilt.


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:24]


def _digest(key: str, count: int, mu: np.ndarray, sigma: np.ndarray) -> str:
    h = hashlib.sha256(f"{key}:{count}".encode())
    h.update(np.ascontiguousarray(mu, np.float64).tobytes())
    h.update(np.ascontiguousarray(sigma, np.float64).tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, key: str) -> str:
    """The cache file's location: a local path or a storage URI (``metrics.cache_dir`` may be ``s3://...``)."""
    return storage.join(storage.resolve(cache_dir), f"fid-reals-{key}.npz")


def load_cached_stats(path: str | Path, key: str) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(count, mu, sigma) from a valid cache file; None when absent, unreadable, foreign or corrupted."""
    try:
        raw = storage.read_bytes(path)
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            file_key, count = str(f["key"]), int(f["count"])
            mu, sigma, digest = np.array(f["mu"], np.float64), np.array(f["sigma"], np.float64), str(f["digest"])
    except Exception:
        return None
    if file_key != key or mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        return None
    if digest != _digest(key, count, mu, sigma) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return None
    return count, mu, sigma


def save_cached_stats(path: str | Path, key: str, count: int, mu: np.ndarray, sigma: np.ndarray) -> str:
    """Write the cache file atomically (temporary name + rename locally, one PUT on object storage)."""
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), count=np.array(count), mu=mu, sigma=sigma,
             digest=np.array(_digest(key, count, mu, sigma)))
    return storage.write_bytes(path, buf.getvalue())
