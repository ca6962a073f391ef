"""IRN training data (docs/method.md §1.2 affinity recipe + 5.2 affinity labels), IRN's VOC12AffinityDataset.

image + IR label map -> random_scale -> normalize -> random_flip -> random_crop (fills 0 / 255)
-> label shrunk with rescale(label, 0.25, nearest) -> (bg_pos, fg_pos, neg) affinity labels over the
(direction, source pixel) pairs of a PathIndex built for the shrunk size.
"""
import numpy as np

from misc import imutils
from misc.imutils import normalize
from misc.indexing import GetAffinityLabelFromIndices
from voc12.dataloader import VOC12SegmentationDataset

LABEL_SCALE = 0.25  # the label grid of the network's stride-4 outputs
TRAIN_SCALE_RANGE = (0.5, 1.5)  # random_scale of the affinity recipe (docs/method.md §1.2)


class VOC12AffinityDataset(VOC12SegmentationDataset):
    """Adds "aff_bg_pos_label", "aff_fg_pos_label", "aff_neg_label" (float32 tensors (n_dirs, n_src))
    and returns the crop's shrunk label map as "reduced_label"."""

    def __init__(self, img_name_list, label_dir, crop_size, voc12_root, indices_from, indices_to,
                 rescale=None, img_normal=normalize, hor_flip=False, crop_method="random"):
        super().__init__(img_name_list, label_dir, crop_size, voc12_root, rescale=rescale,
                         img_normal=img_normal, hor_flip=hor_flip, crop_method=crop_method)
        self.extract_aff_lab_func = GetAffinityLabelFromIndices(indices_from, indices_to)

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        reduced_label = np.array(imutils.rescale(out["label"], LABEL_SCALE, 0))  # writable, for collate
        out["reduced_label"] = reduced_label
        out["aff_bg_pos_label"], out["aff_fg_pos_label"], out["aff_neg_label"] = \
            self.extract_aff_lab_func(reduced_label)
        return out


def irn_training_dataset(img_name_list, label_dir, crop_size, voc12_root, path_index):
    """train_irn's dataset: the affinity recipe (random rescale TRAIN_SCALE_RANGE, flip, random crop) with the
    affinity labels of `path_index` (a misc.indexing.PathIndex of the crop's label grid)."""
    return VOC12AffinityDataset(img_name_list, label_dir=label_dir, crop_size=crop_size, voc12_root=voc12_root,
                                indices_from=path_index.src_indices, indices_to=path_index.dst_indices,
                                rescale=TRAIN_SCALE_RANGE, hor_flip=True, crop_method="random")
