"""make_ins_seg and eval_ins_seg end to end (docs/method.md §9) on a tiny fake VOC with a random-weights IRN:
outputs, the COCO json, resume, provenance, one-line errors for missing inputs, and the AP of known predictions."""
import json
import os

import numpy as np
import pytest
import torch

import run_sample
from fakevoc import driver_args, make_fake_voc
from misc import instance
from misc.instance_eval import load_instance_gt
from misc.report import read_summary
from misc.utils import InputError, save_npz, save_torch
from net.resnet50_irn import EdgeDisplacement
from step import eval_ins_seg
from step import make_ins_seg_labels as mis
from voc12.dataloader import VOC12ClassificationDatasetMSF

SIZES = [(64, 64), (50, 70), (37, 45)]


@pytest.fixture
def world(tmp_path):
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, sizes=SIZES, seed=4)
    args = driver_args(tmp_path / "work", voc12_root=voc["root"], infer_list="train", chainer_eval_set="train",
                       sem_seg_cam_dir=str(tmp_path / "cams"), irn_weights_name=str(tmp_path / "irn.pth"),
                       irn_crop_size=64, backbone_width=8, num_workers=0, rw_radius=5)
    torch.manual_seed(0)
    model = EdgeDisplacement(crop_size=64, backbone_width=8)
    save_torch(args.irn_weights_name, model.state_dict())
    rng = np.random.default_rng(0)
    for img_id in voc["train"]:   # CAMs that peak on the objects of the image's classes
        gt = voc["gt"][img_id]
        keys = np.nonzero(voc["labels"][img_id])[0]
        strided = gt[::4, ::4]
        cam = np.stack([(strided == k + 1) * 0.9 + rng.random(strided.shape) * 0.1 for k in keys])
        save_npz(os.path.join(args.sem_seg_cam_dir, img_id + ".npz"), keys=keys, cam=cam.astype(np.float32))
    return voc, args, model.eval()


def test_make_ins_seg_writes_the_detections_and_coco_and_resumes(world):
    voc, args, model = world
    mis.run(args)
    dataset = VOC12ClassificationDatasetMSF(voc["train"], voc12_root=voc["root"], scales=(1.0,))
    n_annotations = 0
    for pack, size in zip(dataset, SIZES):
        det = instance.read_detections(os.path.join(args.ins_seg_out_dir, pack["name"] + ".npz"))
        assert det["mask"].shape[1:] == size and det["score"].dtype == np.float32 and det["class"].dtype == np.int64
        image_classes = set(np.nonzero(pack["label"].numpy())[0].tolist())
        assert len(det["score"]) >= 1 and set(det["class"].tolist()) <= image_classes
        with torch.inference_mode():   # the same image through the library by hand: the same detections
            boundary, displacement = model(torch.from_numpy(pack["img"][0]))
        cams = np.load(os.path.join(args.sem_seg_cam_dir, pack["name"] + ".npz"))
        expected = instance.instances_of_image(torch.from_numpy(cams["cam"]), cams["keys"], boundary, displacement,
                                               size, bg_thres=0.25, radius=5, beta=10, exp_times=8)
        for key in ("score", "mask", "class"):
            assert np.array_equal(det[key], expected[key]), key
        n_annotations += int((det["score"] >= 1e-5).sum())
    with open(mis.coco_path(args.ins_seg_out_dir, "train")) as f:
        coco_json = json.load(f)
    assert [i["id"] for i in coco_json["images"]] == [int(i.replace("_", "")) for i in voc["train"]]
    assert len(coco_json["annotations"]) == n_annotations and len(coco_json["categories"]) == 20
    with open(os.path.join(args.ins_seg_out_dir, "provenance.json")) as f:
        recorded = json.load(f)["inputs"]
    assert recorded["ins_seg_centroid_iterations"] == 300 and recorded["ins_seg_cluster_thres"] == 2.5

    # resumable: existing files are kept, the json too while no file is newer
    first = os.path.join(args.ins_seg_out_dir, voc["train"][0] + ".npz")
    json_path = mis.coco_path(args.ins_seg_out_dir, "train")
    for name in os.listdir(args.ins_seg_out_dir):   # every source older than the json
        os.utime(os.path.join(args.ins_seg_out_dir, name), (1, 1))
    os.utime(json_path, (2, 2))
    mis.run(args)
    assert os.stat(first).st_mtime == 1 and os.stat(json_path).st_mtime == 2
    os.remove(os.path.join(args.ins_seg_out_dir, voc["train"][1] + ".npz"))
    mis.run(args)   # the missing image is made again, and the json with it
    assert os.stat(first).st_mtime == 1 and os.stat(json_path).st_mtime > 2
    # other inputs: the folder is refused, unless --overwrite
    with pytest.raises(InputError, match="ins_seg_bg_thres: 0.25 -> 0.5"):
        mis.run(driver_args(**{**vars(args), "ins_seg_bg_thres": 0.5}))


def test_eval_ins_seg_scores_known_predictions(world):
    """Predictions = the ground-truth instances (score 1) plus, in the first image, a false one of score 0.5 on
    the background of a class of the image: AP 1 for every class (the false one ranks below every true one); with
    the false one ranked first, its class's AP falls to n/(n+1) (n instances of that class)."""
    voc, args, _ = world
    os.makedirs(args.ins_seg_out_dir)
    class_counts = {}
    for img_id in voc["train"]:
        masks, labels = load_instance_gt(voc["root"], img_id)
        for label in labels:
            class_counts[int(label)] = class_counts.get(int(label), 0) + 1
        score, mask, classes = np.ones(len(labels), np.float32), masks, labels.astype(np.int64)
        if img_id == voc["train"][0]:
            false = np.zeros_like(masks[:1])
            false[0, :3, :3] = True
            score, mask, classes = np.append(score, 0.5).astype(np.float32), np.concatenate([masks, false]), \
                np.append(classes, labels[0])
        save_npz(os.path.join(args.ins_seg_out_dir, img_id + ".npz"), score=score, mask=mask, **{"class": classes})
    eval_ins_seg.run(args)
    entry = next(e for e in read_summary(args.work_dir) if e["name"] == "ins_seg")
    assert entry["step"] == "eval_ins_seg" and entry["map"] == 100.0 and entry["images"] == 3
    assert {c for c, v in entry["ap"].items() if v is not None} == {eval_ins_seg.CAT_LIST[k] for k in class_counts}
    assert entry["coco_ap50"] == 100.0

    # the false detection now ranks first in its class: precision 0, 1/2, ..., n/(n+1) at recall 0, 1/n, ..., 1;
    # rising, so its envelope is n/(n+1) at every recall step: AP = n/(n+1)
    first = voc["train"][0]
    data = dict(np.load(os.path.join(args.ins_seg_out_dir, first + ".npz")))
    false_class = int(data["class"][-1])
    data["score"][-1] = 2.0
    save_npz(os.path.join(args.ins_seg_out_dir, first + ".npz"), **data)
    result = eval_ins_seg.evaluate(args.ins_seg_out_dir, voc["root"], voc["train"])
    n = class_counts[false_class]
    assert result["ap"][false_class] == pytest.approx(n / (n + 1))
    others = [result["ap"][k] for k in class_counts if k != false_class]
    assert all(v == 1 for v in others)
    assert result["map"] == pytest.approx(np.mean(others + [result["ap"][false_class]]))


def test_missing_inputs_are_one_error_line(world, capsys):
    voc, args, _ = world
    argv = ["--device", "cpu", "--work_dir", args.work_dir, "--voc12_root", voc["root"], "--infer_list", "train",
            "--sem_seg_cam_dir", args.sem_seg_cam_dir + "_none", "--irn_weights_name", args.irn_weights_name,
            "--backbone_width", "8", "--irn_crop_size", "64", "--num_workers", "0"]
    assert run_sample.main(argv + ["--make_ins_seg_pass", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "cams_none" in err[0] and "make_cam" in err[0]
    assert run_sample.main(argv + ["--eval_ins_seg_pass", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "instance masks of the evaluated list" in err[0] and "make_ins_seg" in err[0]
    # the instance ground truth is missing (a list of images outside VOC's segmentation split)
    mis.run(args)
    os.remove(os.path.join(voc["root"], "SegmentationObject", voc["train"][2] + ".png"))
    with pytest.raises(InputError, match=r"1 of 3 instance ground truth\(s\) missing"):
        eval_ins_seg.run(args)


def test_both_steps_through_the_driver(world):
    voc, args, _ = world
    argv = ["--device", "cpu", "--work_dir", args.work_dir, "--voc12_root", voc["root"], "--infer_list", "train",
            "--chainer_eval_set", "train", "--sem_seg_cam_dir", args.sem_seg_cam_dir,
            "--irn_weights_name", args.irn_weights_name, "--backbone_width", "8", "--irn_crop_size", "64",
            "--num_workers", "0", "--make_ins_seg_pass", "true", "--eval_ins_seg_pass", "true"]
    assert run_sample.main(argv) == 0
    entry = next(e for e in read_summary(args.work_dir) if e["step"] == "eval_ins_seg")
    assert entry["name"] == "ins_seg" and 0 <= entry["map"] <= 100 and entry["images"] == 3
    assert sorted(os.listdir(os.path.join(args.work_dir, "ins_seg"))) == sorted(
        [i + ".npz" for i in voc["train"]] + ["coco_train.json", "provenance.json"])
