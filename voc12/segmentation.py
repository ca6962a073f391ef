"""DeepLab-v2's training data (docs/method.md §8), deeplab-pytorch's VOC dataset: BGR images, its augmentation and
the training samples as one stream that depends only on (seed, sample index)."""
import os
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from misc.imutils import read_rgb, resize_bilinear, resize_label_nearest
from misc.utils import InputError
from net.deeplab_v2 import IGNORE, MEAN_BGR, N_CLASSES
from voc12.dataloader import img_path, read_index_png


def read_bgr(voc12_root, img_id):
    """The image as cv2.imread gives it, as float32: (H, W, 3) BGR."""
    return np.ascontiguousarray(read_rgb(img_path(voc12_root, img_id))[:, :, ::-1], dtype=np.float32)


def augment(image, label, rng, scales, crop_size, mean=MEAN_BGR):
    """deeplab-pytorch's VOC `_augmentation` then mean subtraction, drawing from `rng` (random.Random).

    image (H, W, 3) float32 BGR, label (H, W) uint8 -> (3, crop, crop) float32, (crop, crop) int64.
    """
    h, w = label.shape
    scale = rng.choice(scales)
    h, w = int(h * scale), int(w * scale)
    image = resize_bilinear(image, (h, w))
    label = resize_label_nearest(label, (h, w)).astype(np.int64)
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    if pad_h or pad_w:  # bottom / right, mean colour and ignore label
        image = np.concatenate([image, np.broadcast_to(np.asarray(mean, np.float32), (h, pad_w, 3))], axis=1)
        image = np.concatenate([image, np.broadcast_to(np.asarray(mean, np.float32),
                                                       (pad_h, w + pad_w, 3))], axis=0)
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
    h, w = label.shape
    top, left = rng.randint(0, h - crop_size), rng.randint(0, w - crop_size)
    image = image[top:top + crop_size, left:left + crop_size]
    label = label[top:top + crop_size, left:left + crop_size]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = (image - np.asarray(mean, np.float32)).transpose(2, 0, 1)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


class SegTrainStream(Dataset):
    """The training samples as one stream: sample k (0-based, over all updates) is image
    perm_e[k % n] of epoch e = k // n, augmented with a generator seeded by (seed, k).

    `start` skips the first samples (resume); the stream is the same whatever the workers.
    """

    def __init__(self, voc12_root, ids, label_dir, seed, n_samples, start, scales, crop_size):
        self.voc12_root, self.ids, self.label_dir = voc12_root, ids, label_dir
        self.seed, self.n_samples, self.start = seed, n_samples, start
        self.scales, self.crop_size = tuple(scales), crop_size
        self._perms = {}

    def __len__(self):
        return self.n_samples - self.start

    def image_index(self, k):
        epoch, pos = divmod(k, len(self.ids))
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))}
        return int(self._perms[epoch][pos])

    def __getitem__(self, j):
        k = self.start + j
        img_id = self.ids[self.image_index(k)]
        path = os.path.join(self.label_dir, img_id + ".png")
        label = read_index_png(path, "a label PNG (class values)")
        if ((label >= N_CLASSES) & (label != IGNORE)).any():
            raise InputError(f"{path} has values outside 0..{N_CLASSES - 1} and {IGNORE}: not a VOC label map")
        rng = random.Random(int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0]))
        image, label = augment(read_bgr(self.voc12_root, img_id), label, rng, self.scales, self.crop_size)
        return torch.from_numpy(image), torch.from_numpy(label)
