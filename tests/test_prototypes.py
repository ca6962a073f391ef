"""wood/prototypes.py: class prototypes and K-means against literal loops; feature extraction I/O."""

import numpy as np
import pytest
import torch
from PIL import Image

import wood.prototypes as prototypes
from misc.steptools import checked_batches
from misc.utils import InputError
from wood.data import OoDFeatureDataset
from wood.prototypes import class_prototypes, extract_features, kmeans, ood_prototypes


def literal_class_prototypes(features, labels):
    C, D = labels.shape[1], features.shape[1]
    out = np.zeros((C, D))
    for c in range(C):
        members = [features[n] for n in range(len(features)) if labels[n, c] == 1]
        if members:
            total = np.zeros(D)
            for f in members:
                total += f
            out[c] = total / len(members)
    return out


def literal_kmeans(points, K, n_iter):
    centroids = [points[j].copy() for j in range(K)]
    for _ in range(n_iter):
        clusters = [[] for _ in range(K)]
        for p in points:
            best, best_d = 0, None
            for j, c in enumerate(centroids):
                d = sum((p[i] - c[i]) ** 2 for i in range(len(p)))
                if best_d is None or d < best_d:  # strict: ties go to the first centroid
                    best, best_d = j, d
            clusters[best].append(p)
        for j in range(K):
            if clusters[j]:
                centroids[j] = sum(clusters[j]) / len(clusters[j])
    return np.stack(centroids)


def test_class_prototypes_two_classes_and_missing_class():
    rng = np.random.RandomState(0)
    feats = rng.randn(6, 5)
    labels = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 0]],
                      dtype=np.float32)  # image 1 and 4 have two classes, class 2 has no image
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[2\]"):
        got = class_prototypes(torch.from_numpy(feats), torch.from_numpy(labels))
    assert got.shape == (4, 5) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), literal_class_prototypes(feats, labels), rtol=1e-12, atol=1e-12)
    # image 1 (two classes) counts for class 0 and class 1
    np.testing.assert_allclose(got[0].numpy(), (feats[0] + feats[1] + feats[4]) / 3)
    np.testing.assert_allclose(got[1].numpy(), (feats[1] + feats[2] + feats[5]) / 3)
    assert torch.equal(got[2], torch.zeros(5)) and torch.isfinite(got).all()


def test_class_prototypes_no_warning_when_every_class_present():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = class_prototypes(torch.ones(2, 3), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(got, torch.ones(2, 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_equals_literal_lloyd(seed, monkeypatch):
    monkeypatch.setattr(prototypes, "KMEANS_CHUNK", 7)  # several chunks, one partial
    rng = np.random.RandomState(seed)
    points = np.concatenate([rng.randn(10, 3) + off for off in (0.0, 4.0, -4.0)])[rng.permutation(30)]
    got = kmeans(torch.from_numpy(points), 4, n_iter=10)
    np.testing.assert_allclose(got.numpy(), literal_kmeans(points, 4, 10), rtol=1e-12, atol=1e-12)


def test_kmeans_initial_centroids_are_first_rows_and_separated_blobs():
    points = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.0, 1.0], [10.0, 11.0], [1.0, 0.0]])
    assert torch.equal(kmeans(points, 2, n_iter=0), points[:2])
    got = kmeans(points, 2, n_iter=10)
    assert torch.allclose(got, torch.tensor([[1 / 3, 1 / 3], [10.0, 10.5]]))


def test_kmeans_empty_cluster_keeps_its_centroid():
    # 1-D points: after the first iteration the centroids are (0, 7/3, 7.5); in the second, 5 moves to
    # the third cluster and the second one is empty from then on: it keeps 7/3 (the original: 0/0 = NaN)
    points = torch.tensor([[0.0], [1.0], [9.0], [6.0], [5.0], [1.0]], dtype=torch.float64)
    assert torch.allclose(kmeans(points, 3, n_iter=1).flatten(), torch.tensor([0.0, 7 / 3, 7.5], dtype=torch.float64))
    got = kmeans(points, 3, n_iter=10)
    assert torch.allclose(got.flatten(), torch.tensor([2 / 3, 7 / 3, 20 / 3], dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), literal_kmeans(points.numpy(), 3, 10))
    # tie at the start: equal first rows, every tied point goes to the first, the second stays empty
    dup = torch.tensor([[3.0, 1.0], [3.0, 1.0], [8.0, 8.0]])
    assert torch.equal(kmeans(dup, 3, n_iter=1), dup)
    assert torch.isfinite(kmeans(dup, 3, n_iter=3)).all()


def test_kmeans_fewer_points_than_k():
    with pytest.raises(InputError, match=r"fewer OoD images than K \(3 < 4\).*--cluster_K"):
        kmeans(torch.randn(3, 2), 4)


class MeanColourNet(torch.nn.Module):
    """Stand-in with the CAM net's feature_list API: the feature is the per-channel mean and max."""

    def forward(self, x):
        return x.mean(dim=(2, 3))

    def feature_list(self, x):
        assert not self.training and x.shape[0] == 1
        feat = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self(x), [x, x, feat]


@pytest.fixture
def ood_folder(tmp_path):
    root = tmp_path / "ood"
    root.mkdir()
    rng = np.random.RandomState(0)
    names = []
    for i in range(5):
        name = f"im{i}.png"
        Image.fromarray(rng.randint(0, 256, (20 + 4 * i, 30, 3)).astype(np.uint8)).save(root / name)
        names.append(name)
    return str(root), names


def test_extract_features_and_ood_prototypes(ood_folder):
    root, names = ood_folder
    model = MeanColourNet().train()
    dataset = OoDFeatureDataset(root, names, long_side=24)
    feats, labels = extract_features(model, dataset, "cpu")
    assert model.training and labels is None and feats.shape == (5, 6)
    for i in range(5):
        img = torch.from_numpy(dataset[i]["img"])
        height = 20 + 4 * i
        scale = 24 / height if 30 < height else 24 / 30
        assert tuple(img.shape[1:]) == (round(height * scale), round(30 * scale)) and max(img.shape[1:]) == 24
        expected = torch.cat([img.mean(dim=(1, 2)), img.amax(dim=(1, 2))])
        assert torch.allclose(feats[i], expected, atol=1e-6)
    prototypes_k3 = ood_prototypes(model, "cpu", names, root, long_side=24, K=3, n_iter=4, num_workers=0)
    assert torch.allclose(prototypes_k3, kmeans(feats, 3, 4))
    with pytest.raises(InputError, match="fewer OoD images than K"):
        ood_prototypes(model, "cpu", names, root, long_side=24, K=6, n_iter=4, num_workers=0)


def test_unreadable_image_is_a_clean_input_error_even_from_a_worker(ood_folder):
    root, names = ood_folder
    with open(f"{root}/im2.png", "wb") as f:
        f.write(b"not a png")
    dataset = OoDFeatureDataset(root, names, long_side=24)
    for workers in (0, 1):
        with pytest.raises(InputError) as err:
            list(checked_batches(dataset, batch_size=1, num_workers=workers))
        assert str(err.value).startswith(f"cannot read image {root}/im2.png")
        assert "Traceback" not in str(err.value)
