"""W-OoD prototypes (docs/method.md §4.3): class prototypes of the ID images, K-means centroids of the OoD
images.

Maths first (pure tensor functions), then the I/O that extracts the 2048-d features
`f(x) = GAP(stage4(x))` (the last entry of `model.feature_list(x)`) with the model in eval mode,
batch 1, no augmentation.
"""
import warnings

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from misc.steptools import checked_batches
from misc.utils import InputError

# rows of the (N, K, D) difference tensor formed at once by `kmeans` (bounds its memory, not its result)
KMEANS_CHUNK = 256


# ------------------------------------------------------------------------------------------ maths

def class_prototypes(features, labels):
    """(C, D) mean feature of the images whose label includes each class.

    features: (N, D); labels: (N, C) multi-hot. An image with two classes counts for both.
    A class without any image has no prototype (the original divides by zero and gets NaN): its row
    is zeros and a RuntimeWarning names it. This is harmless to the loss, which only uses the
    distances to the classes of each training image (a class absent from the training list never
    is one); it is a warning, not an error, because small datasets (ToyVOC) use a subset of the classes.
    """
    features = torch.as_tensor(features)
    labels = torch.as_tensor(labels).to(features.dtype)
    if features.ndim != 2 or labels.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"expected features (N, D) and labels (N, C), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    counts = labels.sum(dim=0)                         # (C,)
    sums = labels.t() @ features                       # (C, D)
    empty = counts == 0
    if empty.any():
        warnings.warn(f"no image of class(es) {empty.nonzero().flatten().tolist()} in the ID list: "
                      f"their prototypes are set to zeros", RuntimeWarning, stacklevel=2)
    return sums / counts.clamp(min=1).unsqueeze(1)


def nearest_centroid(points, centroids):
    """(N,) index of the nearest centroid (squared Euclidean, ties to the first), chunked over points."""
    out = []
    for start in range(0, points.shape[0], KMEANS_CHUNK):
        chunk = points[start:start + KMEANS_CHUNK]
        dist = ((chunk[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)   # (n, K)
        out.append(dist.argmin(dim=1))
    return torch.cat(out)


def require_enough_points(n_points, K):
    """InputError unless there are at least K points (OoD images) to cluster."""
    if n_points < K:
        raise InputError(f"fewer OoD images than K ({n_points} < {K}) for the K-means of the OoD "
                         f"prototypes: lower --cluster_K or add images to the OoD list")


def kmeans(features, K, n_iter=10):
    """Lloyd's K-means, as released: initial centroids = the first K rows, `n_iter` iterations of
    (assign every point to its nearest centroid, set every centroid to the mean of its points).

    Returns the (K, D) centroids. An empty cluster keeps its previous centroid (the original divides
    by zero: README "Deviations"). Fewer points than K -> InputError.
    """
    features = torch.as_tensor(features)
    require_enough_points(features.shape[0], K)
    centroids = features[:K].clone()
    for _ in range(n_iter):
        assign = nearest_centroid(features, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, features)
        counts = torch.bincount(assign, minlength=K).to(features.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1)
    return centroids


# -------------------------------------------------------------------------------------------- I/O

def extract_features(model, dataset, device, num_workers=0, desc="features"):
    """(N, D) features `feature_list(img)[1][-1]` of every item of `dataset` (batch 1, eval mode),
    plus the (N, C) labels when the items have a "label" (else None). The caller's model mode is kept."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        with torch.inference_mode():
            for pack in tqdm(checked_batches(dataset, batch_size=1, shuffle=False, num_workers=num_workers),
                             total=len(dataset), desc=desc):
                _, feature_list = model.feature_list(pack["img"].to(device))
                feats.append(feature_list[-1].reshape(1, -1).float().cpu())
                if "label" in pack:
                    labels.append(pack["label"].float())
    finally:
        model.train(was_training)
    return torch.cat(feats), (torch.cat(labels) if labels else None)


def sharded_features(model, dataset, device, num_workers, desc):
    """`extract_features` of the whole dataset, each rank under torchrun extracting its share (misc/dist.py):
    the same (N, D) features and (N, C) labels on every rank, in the dataset's order."""
    from misc import dist
    n = len(dataset)
    feats, labels = extract_features(model, Subset(dataset, dist.shard(list(range(n)))), device, num_workers, desc)
    return dist.gather_shards(feats, n), (None if labels is None else dist.gather_shards(labels, n))


def id_prototypes(model, device, train_list, voc12_root, num_workers):
    """(C, D) class prototypes over the images of `train_list` (a split name or list file under `voc12_root`):
    full-size images, normalized, no augmentation."""
    from voc12.dataloader import VOC12ClassificationDataset
    dataset = VOC12ClassificationDataset(train_list, voc12_root)
    feats, labels = sharded_features(model, dataset, device, num_workers, desc="ID features")
    return class_prototypes(feats, labels)


def ood_prototypes(model, device, paths, ood_root, long_side, K, n_iter, num_workers):
    """(K, D) K-means centroids (`n_iter` iterations) of the features of the OoD images `paths` (relative to
    `ood_root`; long side resized to `long_side`, normalized)."""
    from wood.data import OoDFeatureDataset
    require_enough_points(len(paths), K)  # before the feature pass, not after it
    dataset = OoDFeatureDataset(ood_root, paths, long_side=long_side)
    feats, _ = sharded_features(model, dataset, device, num_workers, desc="OoD features")
    return kmeans(feats, K, n_iter)
