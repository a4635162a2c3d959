"""Attribute classifiers for linear separability, trained on a dataset's labels (the synthetic dataset's
known generating factors), saved and loaded as a checkpoint.

    python -m stylegan_dist.metrics.classifier --data DIR --out classifier.pt [--resolution R] [--epochs E]

Binary attributes are derived from the labels the manifest lists: a categorical label with K classes gives
K one-vs-rest attributes ('shape=circle', ...); a continuous label gives one attribute 'name>m', thresholded
at the middle m of its declared range (the median of the data when no range is declared). One small CNN
with one logit per attribute is trained with binary cross-entropy; the held-out accuracy of every
attribute (balanced: the mean of the true-positive and true-negative rates) is stored with the weights, so
``ls`` can skip attributes the classifier cannot read (``ls_min_accuracy``, 0.8 by default).

For faces (the paper's 40 CelebA-HQ attributes) supply your own classifier as a ``torch.export`` archive
of a module that maps images [N, 3, R, R] in [-1, 1] to logits [N, A] (attribute present when > 0), exported
with a dynamic batch dimension and saved with
``torch.export.save(ep, path, extra_files={"meta.json": json.dumps({"attributes": [...], "resolution": R})})``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .registry import MetricError, box_downsample_to

FORMAT = "stylegan_dist.attribute_classifier"
FORMAT_VERSION = 1


def binary_attributes(label_specs: list[dict[str, Any]], labels: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """(names, targets [N, A] in {0, 1}) from manifest label specs and label values."""
    names: list[str] = []
    cols: list[np.ndarray] = []
    for spec in label_specs:
        v = np.asarray(labels[spec["name"]])
        if spec["kind"] == "categorical":
            classes = spec.get("classes") or [str(i) for i in range(int(spec["num_classes"]))]
            for i, cls in enumerate(classes):
                names.append(f"{spec['name']}={cls}")
                cols.append(v == i)
        else:
            rng = spec.get("range")
            thr = float(np.mean(rng)) if rng else float(np.median(v))
            names.append(f"{spec['name']}>{thr:g}")
            cols.append(v > thr)
    if not names:
        raise MetricError("The dataset has no labels to train attribute classifiers on.")
    return names, np.stack(cols, axis=1).astype(np.float32)


class AttributeCNN(nn.Module):
    """Images [N, C, R, R] in [-1, 1] -> logits [N, A]: 2 x (conv3x3, batch norm, ReLU), avg pool 2, down to 4x4;
    then 2 dense layers."""

    def __init__(self, resolution: int, num_attributes: int, channels: int = 32, max_channels: int = 128,
                 num_channels: int = 3):
        super().__init__()
        self.arch = dict(resolution=resolution, num_attributes=num_attributes, channels=channels,
                         max_channels=max_channels, num_channels=num_channels)
        layers: list[nn.Module] = []
        cin, c, r = num_channels, channels, resolution
        while r > 4:
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.AvgPool2d(2)]
            cin, c, r = c, min(2 * c, max_channels), r // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * r * r, 128), nn.ReLU(), nn.Linear(128, num_attributes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer [N, 128] (after the first dense layer's ReLU): the feature space of fid_shapes."""
        return self.head[:-1](self.features(x))


class AttributeClassifier:
    """A classifier with its attribute names: images in [-1, 1] at any size -> P(attribute) [N, A]."""

    def __init__(self, net: nn.Module, attributes: list[str], resolution: int,
                 val_accuracy: dict[str, float] | None = None, ident: str = ""):
        if not isinstance(net, torch.fx.GraphModule):  # exported modules have no train/eval switch
            net = net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.attributes = list(attributes)
        self.resolution = int(resolution)
        self.val_accuracy = dict(val_accuracy or {})
        self.ident = ident

    def to(self, device) -> AttributeClassifier:
        if isinstance(self.net, nn.Module) and not isinstance(self.net, torch.fx.GraphModule):
            self.net.to(device)
        elif torch.device(device).type != "cpu":
            self.net = self.net.to(device)
        return self

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Box-downsample (as the official metric does to 256) or bilinearly upsample to the classifier's size."""
        images = box_downsample_to(images.float(), self.resolution)
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False)
        return images

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.net.parameters()), torch.empty(0)).device
        return torch.sigmoid(self.net(self.prepare(images).to(device)).float())

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> penultimate features [N, D] (classifiers built by this module only)."""
        if not isinstance(self.net, AttributeCNN):
            raise MetricError("fid_shapes needs an attribute classifier trained by python -m "
                              "stylegan_dist.metrics.classifier (an exported module has no feature layer to use).")
        device = next(iter(self.net.parameters())).device
        return self.net.embed(self.prepare(images).to(device)).float()


class ClassifierFeatures:
    """uint8 images [N, C, H, W] -> the classifier's penultimate features, as FID's extractor interface wants."""

    def __init__(self, clf: AttributeClassifier):
        self.clf = clf
        self.feature_dim = int(clf.net.head[-1].in_features) if isinstance(clf.net, AttributeCNN) else 0
        self.ident = f"{clf.ident or 'classifier'}:penultimate"

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.clf.embed(images_u8.float() / 127.5 - 1.0)


# --------------------------------------------------------------------------------------------------
# Training


def load_labelled_images(root: str | Path, resolution: int | None, max_images: int | None = None):
    """(uint8 images [N, C, R, R], label specs, labels) of a prepared dataset with labels."""
    from data_pipeline.format import DatasetError
    from data_pipeline.stream import iter_images, open_manifest, read_labels

    try:
        manifest = open_manifest(root)
        resolution = int(resolution or manifest["resolutions"][-1])
        if resolution not in manifest["resolutions"]:
            raise MetricError(f"Dataset {root} has no images at {resolution}x{resolution}.")
        specs = manifest.get("labels") or []
        if not specs:
            raise MetricError(f"Dataset {root} has no labels; attribute classifiers need labelled images.")
        ids, labels = read_labels(root)
        parts, got = [], 0
        for batch_ids, images in iter_images(root, resolution, 1024, with_ids=True):
            parts.append((batch_ids, images))
            got += len(images)
            if max_images and got >= max_images:
                break
    except DatasetError as e:
        raise MetricError(str(e)) from None
    img_ids = np.concatenate([p[0] for p in parts])
    images = torch.cat([p[1] for p in parts])
    if max_images:
        img_ids, images = img_ids[:max_images], images[:max_images]
    pos = np.searchsorted(ids, img_ids)
    labels = {k: v[pos] for k, v in labels.items()}
    return images, specs, labels, resolution


def train_classifier(root: str | Path, *, resolution: int | None = None, epochs: int = 10, batch_size: int = 64,
                     lr: float = 1e-3, val_fraction: float = 0.1, max_images: int | None = None, seed: int = 0,
                     device: str | torch.device = "cpu", channels: int = 32, log=print) -> AttributeClassifier:
    images, specs, labels, resolution = load_labelled_images(root, resolution, max_images)
    names, targets = binary_attributes(specs, labels)
    n = len(images)
    if n < 10:
        raise MetricError(f"Dataset {root} has only {n} images; train the classifier on at least a few hundred.")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(n * val_fraction)))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    y = torch.from_numpy(targets)
    torch.manual_seed(seed)
    net = AttributeCNN(resolution, len(names), channels=channels, num_channels=images.shape[1]).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(tr_idx) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x = images[idx].to(device).float() / 127.5 - 1.0
            loss = F.binary_cross_entropy_with_logits(net(x), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = _accuracy(net, images[val_idx], y[val_idx], device)
        if log:
            log(f"  epoch {epoch + 1}/{epochs}: loss {total / len(tr_idx):.4f}, held-out balanced "
                f"accuracy {float(np.mean(acc)):.3f} ({time.time() - t0:.1f} s)")
    acc = _accuracy(net, images[val_idx], y[val_idx], device)
    return AttributeClassifier(net.cpu(), names, resolution, dict(zip(names, map(float, acc))))


@torch.no_grad()
def _accuracy(net: nn.Module, images: torch.Tensor, y: torch.Tensor, device) -> np.ndarray:
    """Balanced accuracy per attribute, (TPR + TNR) / 2: 0.5 for a classifier that always says the majority
    class, which plain accuracy would rate 0.75 on a one-vs-rest attribute of 4 balanced classes."""
    net.eval()
    pred = torch.cat([(net(images[i:i + 256].to(device).float() / 127.5 - 1.0) > 0).float().cpu()
                      for i in range(0, len(images), 256)])
    pos, neg = y.sum(0), (1 - y).sum(0)
    tpr = (pred * y).sum(0) / pos.clamp(min=1)
    tnr = ((1 - pred) * (1 - y)).sum(0) / neg.clamp(min=1)
    # An attribute absent from the held-out set is judged on the class it has.
    bal = torch.where(pos == 0, tnr, torch.where(neg == 0, tpr, (tpr + tnr) / 2))
    return bal.numpy()


# --------------------------------------------------------------------------------------------------
# Saving and loading


def save_classifier(clf: AttributeClassifier, path: str | Path, extra: dict | None = None) -> Path:
    if not isinstance(clf.net, AttributeCNN):
        raise MetricError("Only classifiers built by this module can be saved in its checkpoint format.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "arch": clf.net.arch,
           "state_dict": {k: v.cpu() for k, v in clf.net.state_dict().items()}, "attributes": clf.attributes,
           "resolution": clf.resolution, "val_accuracy": clf.val_accuracy, "extra": extra or {}}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> AttributeClassifier:
    """Our checkpoint format, or a torch.export archive with a meta.json extra file (see the module doc)."""
    import warnings

    from .weights import file_digest

    path = Path(path)
    ident = f"classifier:{file_digest(path)[:16]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            net = AttributeCNN(**obj["arch"])
            net.load_state_dict(obj["state_dict"])
        except (KeyError, TypeError, RuntimeError):
            raise MetricError(f"Attribute classifier {path} does not match this version's network; train it again "
                              f"with python -m stylegan_dist.metrics.classifier.") from None
        return AttributeClassifier(net, obj["attributes"], obj["resolution"], obj.get("val_accuracy"),
                                   ident).to(device)
    extra = {"meta.json": ""}
    try:
        net = torch.export.load(str(path), extra_files=extra).module()
    except Exception:
        raise MetricError(f"{path} is neither a stylegan_dist attribute classifier nor a torch.export archive.") \
            from None
    try:
        meta = json.loads(extra["meta.json"] or "{}")
        attributes, resolution = list(meta["attributes"]), int(meta["resolution"])
    except (ValueError, KeyError, TypeError):
        raise MetricError(f"Exported classifier {path} lacks a meta.json extra file with 'attributes' and "
                          f"'resolution'.") from None
    return AttributeClassifier(net, attributes, resolution, None, ident).to(device)


# --------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.metrics.classifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, metavar="DIR", help="prepared dataset with labels (e.g. made by "
                    "data_pipeline.synthetic)")
    ap.add_argument("--out", required=True, metavar="FILE", help="classifier checkpoint to write")
    ap.add_argument("--resolution", type=int, help="image size to train at (default: the dataset's largest; use "
                    "the generator's final resolution)")
    ap.add_argument("--epochs", type=int, default=10, help="passes over the training images (default: 10)")
    ap.add_argument("--batch", type=int, default=64, help="minibatch size (default: 64)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--max-images", type=int, help="use at most this many images (default: all)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction for the accuracy report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = ap.parse_args(argv)
    try:
        print(f"Training attribute classifiers on {args.data} ...")
        clf = train_classifier(args.data, resolution=args.resolution, epochs=args.epochs, batch_size=args.batch,
                               lr=args.lr, val_fraction=args.val_fraction, max_images=args.max_images,
                               seed=args.seed, device=args.device)
        save_classifier(clf, args.out, extra={"data": str(Path(args.data).resolve())})
    except MetricError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nHeld-out balanced accuracy per attribute ({clf.resolution}x{clf.resolution}):")
    for name in clf.attributes:
        print(f"  {name:<24} {clf.val_accuracy[name]:.3f}")
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
