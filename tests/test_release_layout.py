"""The W-OoD README followed literally: its file layout is the paper preset's, and
bash_run_sample.sh names each missing piece with its README step and place."""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import run_sample
from net.classifier import load_classifier
from step import mine_ood, train_cam
from tests.fakevoc import make_fake_voc
from tests.test_cam_net import WIDTH, OriginalStyleNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_release_files_at_their_places_are_used(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_fake_voc(tmp_path / "Data" / "VOC2012", n_train=2, n_val=1, size=32, seed=0)
    images = tmp_path / "WOoD_dataset" / "openimages" / "OoD_images"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.jpg")
    (tmp_path / "WOoD_dataset" / "openimages" / "ood_list.txt").write_text("a.jpg\n")
    torch.manual_seed(0)
    released = OriginalStyleNet("wood").eval()       # the paper's classifier has W-OoD's alias layout
    (tmp_path / "sess").mkdir()
    torch.save(released.state_dict(), tmp_path / "sess" / "res50_cam_orig.pth.pth")
    args = run_sample.parse_args(["--work_dir", str(tmp_path / "work"), "--device", "cpu",
                                  "--backbone_width", str(WIDTH)])
    train_cam.run(args)
    assert "sess/res50_cam_orig.pth.pth exists; keeping it (no provenance record" in capsys.readouterr().out
    mine_ood.run(args)
    assert "WOoD_dataset/openimages/ood_list.txt exists; keeping it (no provenance record" in capsys.readouterr().out
    model = load_classifier(args.cam_weights_name, args.backbone, args.backbone_width, args.device, "cam")
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(x), released.cam(x))


def test_paper_run_without_data_names_each_readme_step(tmp_path):
    done = subprocess.run(["bash", "bash_run_sample.sh", "--device", "cpu", "--voc12_root", str(tmp_path / "VOC2012"),
                           "--ood_list", str(tmp_path / "ood_list.txt"), "--ood_pool_list", str(tmp_path / "c.txt")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 1
    lines = [line for line in done.stdout.splitlines() if line.startswith("  - ")]
    assert len(lines) == 4, done.stdout
    assert "README step 1 (PASCAL VOC 2012)" in lines[0] and str(tmp_path / "VOC2012") in lines[0]
    assert "JPEGImages Annotations SegmentationClass ImageSets/Segmentation" in lines[0]
    assert "README step 1 (SBD" in lines[1] and "SegmentationClassAug" in lines[1]
    assert "README step 2 (OoD images)" in lines[2] and str(tmp_path / "ood_list.txt") in lines[2]
    assert "README step 4 (DeepLab-v2's ImageNet init)" in lines[3] and "--seg_init_weights" in lines[3]
