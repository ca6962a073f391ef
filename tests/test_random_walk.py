"""Random walk (docs/method.md §5.3): the sparse walk equals the dense formulation; make_sem_seg_labels end to end."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_indexing import literal_walk_affinity

from misc import indexing
from misc.utils import InputError, save_npz, save_torch
from net.resnet50_irn import EdgeDisplacement
from step import make_sem_seg_labels as msl

# float32 products accumulate rounding over 2^8 steps (measured: ~7e-5 of the maximum)
REL_TOL = 3e-4


def literal_walk(seeds, boundary, radius, beta, exp_times):
    """docs/method.md §5.3 in float64 numpy: A by loops, T = column-normalised A ** beta, X @ T^(2^exp_times)."""
    n, h, w = seeds.shape
    a = np.eye(h * w)
    for (p, q), v in literal_walk_affinity(boundary, radius).items():
        a[p, q] = a[q, p] = v
    t = a ** beta
    t = t / t.sum(axis=0, keepdims=True)
    x = (seeds * (1 - boundary)).reshape(n, -1)
    return (x @ np.linalg.matrix_power(t, 2 ** exp_times)).reshape(n, h, w)


def _maps(size, n, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    boundary = torch.rand(h, w, generator=g) ** 3
    boundary[:, w // 2] = 0.95  # a wall the walk has to respect
    seeds = torch.rand(n, h, w, generator=g) ** 4
    return seeds, boundary


def _labels(walked, thres=0.22):
    walked = walked / walked.max()
    return np.argmax(np.concatenate([np.full((1,) + walked.shape[1:], thres), walked]), axis=0)


@pytest.mark.parametrize("size,n,radius,beta,exp_times", [((14, 11), 2, 5, 10, 8), ((9, 16), 3, 3, 10, 4),
                                                           ((24, 21), 2, 5, 10, 8)])
def test_sparse_walk_equals_dense_walk(size, n, radius, beta, exp_times):
    seeds, boundary = _maps(size, n, seed=sum(size))
    sparse = indexing.random_walk(seeds, boundary, radius, beta, exp_times)
    dense = indexing.dense_random_walk(seeds, boundary, radius, beta, exp_times)
    assert sparse.shape == dense.shape == seeds.shape and sparse.dtype == torch.float32
    scale = dense.abs().max().item()
    assert scale > 0
    assert (sparse - dense).abs().max().item() <= REL_TOL * scale
    assert np.array_equal(_labels(sparse.numpy()), _labels(dense.numpy()))
    if size[0] * size[1] <= 160:  # both against the method's formula in float64 (small maps: n^3 work)
        literal = literal_walk(seeds.double().numpy(), boundary.double().numpy(), radius, beta, exp_times)
        np.testing.assert_allclose(dense.numpy(), literal, rtol=0, atol=REL_TOL * scale)
        np.testing.assert_allclose(sparse.numpy(), literal, rtol=0, atol=REL_TOL * scale)
        assert np.array_equal(_labels(literal), _labels(sparse.numpy()))


def test_sparse_walk_in_float64_matches_the_literal_formula_closely():
    seeds, boundary = _maps((10, 13), 2, seed=7)
    seeds, boundary = seeds.double(), boundary.double()
    sparse = indexing.random_walk(seeds, boundary, 5, 10, 8).numpy()
    literal = literal_walk(seeds.numpy(), boundary.numpy(), 5, 10, 8)
    np.testing.assert_allclose(sparse, literal, rtol=1e-9, atol=1e-12 * np.abs(literal).max())


def test_walk_stops_at_boundaries():
    """A seed left of a full-height wall (B = 1) keeps all its mass on the left side."""
    h, w = 8, 12
    boundary = torch.zeros(h, w)
    boundary[:, 6] = 1.0
    seeds = torch.zeros(1, h, w)
    seeds[0, 3, 2] = 1.0
    walked = indexing.random_walk(seeds, boundary, 5, 10, 6)[0]
    assert walked[:, 6:].abs().max().item() == 0
    assert walked[:, :6].min().item() > 0


def bilinear_up(x, factor):
    """Literal bilinear up-sampling (align_corners=False) of a 2-D array."""
    h, w = x.shape
    def coords(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) / factor - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo
    y0, y1, fy = coords(h * factor, h)
    x0, x1, fx = coords(w * factor, w)
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bottom = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_walk_to_label_matches_the_literal_rule():
    rng = np.random.default_rng(0)
    walked = rng.random((2, 5, 7)).astype(np.float32) ** 3
    keys = np.array([4, 11])
    pred = indexing.walk_to_label(torch.from_numpy(walked), keys, (18, 25), 0.22)
    up = np.stack([bilinear_up(m.astype(np.float64), 4)[:18, :25] for m in walked])
    up = up / up.max()
    index = np.argmax(np.concatenate([np.full((1, 18, 25), 0.22), up]), axis=0)
    expected = np.array([0, 5, 12])[index]
    assert pred.dtype == np.uint8 and pred.shape == (18, 25)
    assert (pred == expected).mean() > 0.999  # float32 vs float64 may flip a near-tie
    assert set(np.unique(pred)) == {0, 5, 12}
    # ties go to the background; no key: all background
    flat = torch.ones(1, 3, 3)
    assert (indexing.walk_to_label(flat, [2], (12, 12), 1.0) == 0).all()
    assert (indexing.walk_to_label(flat, [2], (12, 12), 0.99) == 3).all()
    assert (indexing.walk_to_label(torch.zeros(0, 3, 3), [], (10, 9), 0.2) == 0).all()


# ------------------------------------------------------------------------------------- end to end

def _args(tmp_path, voc, **kw):
    args = dict(voc12_root=voc["root"], infer_list="train", sem_seg_cam_dir=str(tmp_path / "cams"),
                sem_seg_out_dir=str(tmp_path / "pseudo_mask"), irn_weights_name=str(tmp_path / "irn.pth"),
                irn_crop_size=64, backbone="resnet50", backbone_width=8, device="cpu", num_workers=0,
                rw_radius=5, beta=10,
                exp_times=8, np_power=1.5, sem_seg_bg_thres=0.22)
    args.update(kw)
    return argparse.Namespace(**args)


def _write_seeds(args, voc, ids, rng):
    for img_id in ids:
        h, w = voc["gt"][img_id].shape
        keys = np.nonzero(voc["labels"][img_id])[0]
        cam = rng.random((keys.size, (h - 1) // 4 + 1, (w - 1) // 4 + 1)).astype(np.float32)
        save_npz(os.path.join(args.sem_seg_cam_dir, img_id + ".npz"), keys=keys, cam=cam)


def test_make_sem_seg_labels_end_to_end(tmp_path):
    from fakevoc import make_fake_voc
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, sizes=[(64, 64), (50, 70), (37, 45)], seed=1)
    args = _args(tmp_path, voc)
    torch.manual_seed(0)
    model = EdgeDisplacement(crop_size=64, backbone_width=8)
    model.mean_shift.running_mean.fill_(0.5)
    save_torch(args.irn_weights_name, model.state_dict())
    _write_seeds(args, voc, voc["train"], np.random.default_rng(0))

    msl.run(args)
    model.eval()
    from misc.imutils import hwc_to_chw, normalize, read_rgb
    from voc12.dataloader import img_path
    for img_id in voc["train"]:
        pred = np.asarray(Image.open(os.path.join(args.sem_seg_out_dir, img_id + ".png")))
        colour = Image.open(os.path.join(msl.color_dir(args.sem_seg_out_dir), img_id + ".png"))
        assert colour.mode == "P" and np.array_equal(np.asarray(colour), pred)
        assert pred.shape == voc["gt"][img_id].shape
        # the same image through the dense formulation of the original
        img = hwc_to_chw(normalize(read_rgb(img_path(voc["root"], img_id))))
        with torch.inference_mode():
            boundary, _ = model(torch.from_numpy(np.stack([img, img[:, :, ::-1].copy()])))
        seeds = np.load(os.path.join(args.sem_seg_cam_dir, img_id + ".npz"))
        dense = indexing.dense_random_walk(torch.from_numpy(seeds["cam"] ** 1.5), boundary, 5, 10, 8)
        expected = indexing.walk_to_label(dense, seeds["keys"], pred.shape, 0.22)
        assert (pred == expected).mean() > 0.999
        assert set(np.unique(pred)) <= {0} | set((seeds["keys"] + 1).tolist())

    # resumable: existing outputs are not rewritten
    first = voc["train"][0]
    out = os.path.join(args.sem_seg_out_dir, first + ".png")
    os.utime(out, (1, 1))
    msl.run(args)
    assert os.stat(out).st_mtime == 1


def test_seed_files_that_do_not_fit_are_named(tmp_path):
    from fakevoc import make_fake_voc
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=1, n_val=1, seed=2)
    args = _args(tmp_path, voc)
    save_torch(args.irn_weights_name, EdgeDisplacement(crop_size=64, backbone_width=8).state_dict())
    img_id = voc["train"][0]
    path = os.path.join(args.sem_seg_cam_dir, img_id + ".npz")
    keys = np.nonzero(voc["labels"][img_id])[0]
    wrong = np.array([k for k in range(20) if k not in keys][:1])
    save_npz(path, keys=wrong, cam=np.ones((1, 16, 16), np.float32))
    with pytest.raises(InputError, match=f"{path}.*classes"):
        msl.run(args)
    save_npz(path, keys=keys, high_res=np.ones((keys.size, 64, 64), np.float32))
    with pytest.raises(InputError, match=f"{path} has no 'cam'"):
        msl.run(args)
    save_npz(path, keys=keys, cam=np.ones((keys.size, 15, 16), np.float32))
    with pytest.raises(InputError, match=rf"{path}: cam \(.*\) is not one map per key .* at size \(16, 16\)"):
        msl.run(args)
    os.remove(path)
    with pytest.raises(InputError, match=f"missing from {args.sem_seg_cam_dir}"):
        msl.run(args)
    assert not os.path.exists(os.path.join(args.sem_seg_out_dir, img_id + ".png"))
