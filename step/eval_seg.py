"""DeepLab-v2 predictions and their mIoU (docs/method.md §8), deeplab-pytorch's `main.py test` and `main.py crf`.

Per image of --seg_eval_list (val): the MSC max logits of the whole image, up-sampled, soft-max, arg-max; with
--seg_crf also after deeplab-pytorch's dense CRF, whose image is, as released, the mean-subtracted BGR image cast
to uint8 (--seg_crf_real_image: the real image; docs/deviations.md). Writes `<work_dir>/<seg_name>_<split>[_crf]/
<id>.png` (class values; palette copies in `..._color/`), the summary.json entries `<seg_name>_<split>[_crf]`,
the samples.png column (`<seg_name>_samples`) and, when the test list and images exist, the VOC server's layout
`<work_dir>/<seg_name>_test/results/VOC2012/Segmentation/comp6_test_cls/`. Resumable: predictions made by the
same network (provenance record) are kept. The network runs in this process on --device; the CRF, the arg-maxes and
the PNG writes of each image run in --num_workers CPU processes (per rank under torchrun; 0 or 1: this process).
"""
import os

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from pydensecrf.utils import unary_from_softmax

from misc import dist, provenance
from misc.imutils import read_rgb
from misc.metrics import score_label_folder
from misc.parallel import helper_pool, imap_in_pool
from misc.report import add_to_summary, summary_entry
from misc.summary import N_SAMPLES
from misc.utils import InputError, palette_voc, save_png
from net.deeplab_v2 import MEAN_BGR, N_CLASSES, deeplab_v2
from voc12.dataloader import img_path, load_img_name_list, require_images
from voc12.segmentation import read_bgr

# deeplab-pytorch configs/voc12.yaml CRF section
CRF_ITER_MAX = 10
CRF_POS_W, CRF_POS_XY_STD = 3, 1
CRF_BI_W, CRF_BI_XY_STD, CRF_BI_RGB_STD = 4, 67, 3
SERVER_SUBDIR = os.path.join("results", "VOC2012", "Segmentation", "comp6_test_cls")


def quirk_crf_image(image_minus_mean):
    """deeplab-pytorch's CRF image: the mean-subtracted BGR float image `.astype(np.uint8)` (HWC).

    numpy's float -> uint8 cast truncates toward zero and wraps modulo 256 on x86 (-3.7 -> 253,
    -120.2 -> 136); written out explicitly so it does not depend on the platform.
    """
    return (np.trunc(image_minus_mean).astype(np.int64) % 256).astype(np.uint8)


def dense_crf(image, prob):
    """deeplab-pytorch's DenseCRF: unary -log(prob), Gaussian and bilateral terms, 10 iterations.

    image (H, W, 3) uint8, prob (C, H, W) float32 soft-max -> (C, H, W) float32 marginals.
    """
    c, h, w = prob.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    d.addPairwiseGaussian(sxy=CRF_POS_XY_STD, compat=CRF_POS_W)
    d.addPairwiseBilateral(sxy=CRF_BI_XY_STD, srgb=CRF_BI_RGB_STD, rgbim=np.ascontiguousarray(image),
                           compat=CRF_BI_W)
    return np.array(d.inference(CRF_ITER_MAX), dtype=np.float32).reshape((c, h, w))


@torch.inference_mode()
def predict_prob(model, image_minus_mean, device):
    """(C, H, W) float32 soft-max of the MSC max logits up-sampled (bilinear) to the image size."""
    h, w = image_minus_mean.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image_minus_mean.transpose(2, 0, 1)))[None].to(device)
    logits = F.interpolate(model(x), size=(h, w), mode="bilinear", align_corners=False)
    return F.softmax(logits, dim=1)[0].cpu().numpy()


def out_dir(args, split, crf):
    return os.path.join(args.work_dir, f"{args.seg_name}_{split}" + ("_crf" if crf else ""))


def server_dir(args):
    return os.path.join(args.work_dir, f"{args.seg_name}_test", SERVER_SUBDIR)


def write_server_png(folder, img_id, pred):
    """The VOC server's format: a palette PNG of class values <folder>/<id>.png."""
    save_png(os.path.join(folder, img_id + ".png"), pred, palette=palette_voc())


def _test_ids(args):
    """The test ids when their list and images exist, else None (VOC's test images are a separate download)."""
    spec = args.seg_test_list  # a split name means ImageSets/Segmentation/<name>.txt (test is no VOC12 split here)
    listed = os.path.join(args.voc12_root, "ImageSets", "Segmentation", spec + ".txt")
    if not os.path.isfile(spec) and os.path.isfile(listed):
        spec = listed
    try:
        ids = load_img_name_list(args.voc12_root, spec)
    except InputError:
        return None
    return ids if all(os.path.isfile(img_path(args.voc12_root, i)) for i in ids) else None


def provenance_inputs(args, kind="crf"):
    """What decides the predictions of a folder of `kind` (plain, crf, server; misc/provenance.py)."""
    inputs = {"weights": provenance.file_digest(args.seg_weights_name), "kind": kind,
              **provenance.flag_values(args, ["seg_width"])}
    if kind != "plain" and args.seg_crf:
        inputs.update(provenance.flag_values(args, ["seg_crf_real_image"]))
    return inputs


def write_predictions(folders, img_id, prob, crf_image):
    """Arg-max of the soft-max `prob` (C, H, W) and, with a "crf" folder, arg-max after the dense CRF of
    `crf_image` (docs/method.md §8), written into `folders` (palette copies in `..._color/`; the server's
    folder last). Module-level: the CRF pool's processes run it."""
    palette = palette_voc()
    preds = {"plain": np.argmax(prob, axis=0).astype(np.uint8)}
    if folders.get("crf"):
        preds["crf"] = np.argmax(dense_crf(crf_image, prob), axis=0).astype(np.uint8)
    for kind in ("plain", "crf"):
        if kind in preds:
            save_png(os.path.join(folders[kind] + "_color", img_id + ".png"), preds[kind], palette=palette)
            save_png(os.path.join(folders[kind], img_id + ".png"), preds[kind])
    if folders.get("server"):
        write_server_png(folders["server"], img_id, preds.get("crf", preds["plain"]))


def predict_split(args, model, device, ids, folders, pool=None):
    """Write the predictions of `ids` into folders {"plain": dir, "crf": dir or None, "server": dir or None};
    predictions already there are kept only if the same network made them (else the step stops, or with
    --overwrite recomputes them). The network runs here; the rest of each image in `pool` (misc.parallel's
    helper_pool: --num_workers CPU processes, at most twice that many images in flight), or here if None."""
    for kind, folder in folders.items():
        if folder:
            dist.main_first(provenance.claim_folder, folder, "eval_seg", provenance_inputs(args, kind), ".png",
                            args, "--seg_weights_name / --seg_name")
    dist.barrier()  # under torchrun: every rank lists the same images still to do, then takes its share
    todo = [i for i in ids if not all(os.path.isfile(os.path.join(f, i + ".png")) for f in folders.values() if f)]
    dist.barrier()
    last = folders.get("server") or folders.get("crf") or folders["plain"]  # the folder written last
    progress = dist.GlobalProgress([os.path.join(last, i + ".png") for i in todo],
                                   f"eval_seg: {os.path.basename(folders['plain'])}")
    mine = dist.shard(todo)

    def jobs():  # the network, in this process: one (folders, id, soft-max, CRF image) per image
        for img_id in mine:
            image = read_bgr(args.voc12_root, img_id) - np.asarray(MEAN_BGR, np.float32)
            crf_image = None
            if folders.get("crf"):
                crf_image = read_rgb(img_path(args.voc12_root, img_id)) if args.seg_crf_real_image \
                    else quirk_crf_image(image)
            yield folders, img_id, predict_prob(model, image, device), crf_image

    for _ in imap_in_pool(pool, write_predictions, jobs(), 2 * args.num_workers):
        progress.update(1)  # an image is counted once all its PNGs are written
    progress.close()
    dist.barrier()  # all predictions exist before anyone scores them


def run(args):
    device = torch.device(args.device)
    model = deeplab_v2(N_CLASSES, args.seg_weights_name, width=args.seg_width).to(device).eval()
    # the CRF (1-3 s a VOC image) in --num_workers CPU processes (per rank), shared by the splits; without a CRF
    # the arg-max and writes are cheaper here than the soft-max's trip to another process
    with helper_pool(args.num_workers if args.seg_crf else 0) as pool:
        _evaluate(args, model, device, pool)


def _evaluate(args, model, device, pool):
    ids = load_img_name_list(args.voc12_root, args.seg_eval_list)
    require_images(args.voc12_root, ids)
    split = os.path.splitext(os.path.basename(args.seg_eval_list))[0]
    folders = {"plain": out_dir(args, split, False), "crf": out_dir(args, split, True) if args.seg_crf else None}
    predict_split(args, model, device, ids, folders, pool)
    for kind, folder in folders.items():
        if folder is None or not dist.is_main():  # scored once, by rank 0
            continue
        name = os.path.basename(folder)
        result = score_label_folder(folder, args.voc12_root, ids)
        add_to_summary(args.work_dir, summary_entry(name, "eval_seg", result))
        print(f"eval_seg: {name} mIoU {result['miou'] * 100:.2f} % on {len(ids)} images ({args.seg_eval_list})")
    # the rows of the run's samples.png (misc/summary.py): the first images of the evaluated list
    # (summary.SEG_SAMPLES is the default run's <seg_name>_samples)
    sample_ids = load_img_name_list(args.voc12_root, args.chainer_eval_set)[:N_SAMPLES]
    samples = os.path.join(args.work_dir, f"{args.seg_name}_samples")
    predict_split(args, model, device, sample_ids,
                  {"plain": samples + "_nocrf", "crf": samples} if args.seg_crf else {"plain": samples}, pool)
    test_ids = _test_ids(args)
    if test_ids is None:
        print(f"eval_seg: no {args.seg_test_list} list with its images under {args.voc12_root}: no server predictions")
        return
    folders = {"plain": out_dir(args, "test", False), "crf": out_dir(args, "test", True) if args.seg_crf else None,
               "server": server_dir(args)}
    predict_split(args, model, device, test_ids, folders, pool)
    print(f"eval_seg: {len(test_ids)} test predictions in {server_dir(args)} (zip `results/` for the server)")
