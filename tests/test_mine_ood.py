"""step/mine_ood.py: selection rule, precision/recall, and the step end to end on a tiny pool."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from misc.utils import InputError, save_torch
from net.resnet50_cam import Net
from step import mine_ood
from voc12.dataloader import CAT_LIST
from wood.data import OoDFeatureDataset
from wood.mining import hard_ood_scores, mining_quality, select_hard_ood

torch.set_num_threads(1)  # the test machine's 2 cores are shared: more threads only contend


def test_select_hard_ood_threshold_exclusion_cap_and_order():
    scores = [0.5, 0.9, 0.7, 0.95, 0.7, 0.2, 0.8]
    excluded = [False, False, False, True, False, False, False]
    kept, reasons = select_hard_ood(scores, 0.5, excluded)
    assert kept == [1, 6, 2, 4]  # 0.5 is not > 0.5; 3 excluded; the tie 0.7 keeps list order
    assert reasons == ["below_threshold", "kept", "kept", "excluded", "kept", "below_threshold", "kept"]
    kept, reasons = select_hard_ood(scores, 0.5, excluded, max_keep=2)
    assert kept == [1, 6] and reasons[2] == reasons[4] == "over_cap" and reasons[3] == "excluded"
    assert select_hard_ood(scores, 0.99, [False] * 7)[0] == []


def test_hard_ood_scores():
    logits = torch.tensor([[0.0, 2.0, -1.0], [-3.0, -4.0, -2.0]])
    score, top = hard_ood_scores(logits)
    assert torch.allclose(score, torch.sigmoid(torch.tensor([2.0, -2.0]))) and top.tolist() == [1, 2]


def test_mining_quality():
    manifest = [{"path": "a", "hard": True}, {"path": "b", "hard": True}, {"path": "c", "hard": False},
                {"path": "d", "hard": True}]
    q = mining_quality(["a", "c", "d"], manifest)
    assert q == {"kept": 3, "hard": 3, "true_positives": 2, "precision": 2 / 3, "recall": 2 / 3}


@pytest.fixture
def pool(tmp_path):
    root = tmp_path / "pool"
    (root / "images").mkdir(parents=True)
    rng = np.random.RandomState(0)
    names = []
    for i in range(8):
        name = f"images/c{i}.png"
        shape = (40 + 3 * i, 56, 3) if i != 2 else (50, 44)  # one grayscale candidate
        Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8)).save(root / name)
        names.append(name)
    (tmp_path / "candidates.txt").write_text("".join(n + "\n" for n in names))
    manifest = [{"path": n, "hard": i % 2 == 0, "cue": None} for i, n in enumerate(names)]
    (root / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(0)
    net = Net(width=8, frozen_bn=True, detach_stage2=False)
    with torch.no_grad():
        net.classifier.weight.mul_(0.1)  # scores between 0 and 1, not saturated
    weights = tmp_path / "cam.pth"
    save_torch(str(weights), net.state_dict())
    args = argparse.Namespace(device="cpu", num_workers=0, work_dir=str(tmp_path / "work"), backbone="resnet50",
                              backbone_width=8,
                              cam_weights_name=str(weights), ood_pool_root=str(root),
                              ood_pool_list=str(tmp_path / "candidates.txt"), ood_root=str(root),
                              ood_list=str(tmp_path / "work" / "ood_list.txt"), ood_long_side=32,
                              mine_th=0.5, mine_max_keep=None, mine_exclude=None)
    return args, names, net.eval()


def direct_scores(args, names, net):
    ds = OoDFeatureDataset(args.ood_pool_root, names, long_side=args.ood_long_side)
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(net(torch.from_numpy(ds[i]["img"])[None])) for i in range(len(ds))])
    return probs.max(dim=1)


def test_mine_ood_end_to_end(pool, tmp_path, capsys):
    args, names, net = pool
    score, top = direct_scores(args, names, net)
    args.mine_th = float(score.median())  # about half of them are "hard"
    exclude = tmp_path / "exclude.txt"
    order = sorted(range(8), key=lambda i: -score[i].item())
    exclude.write_text(f"# rejected by a human\n{names[order[0]]}\nnot/a/candidate.png\n")
    args.mine_exclude = str(exclude)
    mine_ood.run(args)
    expected = [names[i] for i in order if score[i] > args.mine_th and i != order[0]]
    assert len(expected) >= 2
    assert open(args.ood_list).read().splitlines() == expected

    rows = [line.split("\t") for line in open(os.path.join(args.work_dir, "ood_scores.tsv")).read().splitlines()]
    assert rows[0] == ["path", "score", "top_class", "kept", "reason"] and len(rows) == 9
    table = {r[0]: r for r in rows[1:]}
    for i, name in enumerate(names):
        assert float(table[name][1]) == pytest.approx(score[i].item(), abs=1e-5)
        assert table[name][2] == CAT_LIST[top[i]]
        assert table[name][3] == ("1" if name in expected else "0")
    assert table[names[order[0]]][4] == "excluded"
    with Image.open(os.path.join(args.work_dir, "ood_contact.png")) as sheet:
        assert sheet.size == (len(expected) * 128, 128 + 14)
    out = capsys.readouterr().out
    hard_kept = sum(names.index(p) % 2 == 0 for p in expected)
    assert f"precision {hard_kept / len(expected):.3f} ({hard_kept}/{len(expected)})" in out
    assert f"recall {hard_kept / 4:.3f} ({hard_kept}/4)" in out
    assert "1 path(s) of" in out  # the unknown exclusion is reported

    # an existing list is never overwritten
    open(args.ood_list, "w").write("mine\n")
    mine_ood.run(args)
    assert open(args.ood_list).read() == "mine\n"


def test_mine_ood_cap_and_nothing_kept(pool):
    args, names, net = pool
    score, _ = direct_scores(args, names, net)
    args.mine_th, args.mine_max_keep = float(score.min()) - 1e-3, 3
    mine_ood.run(args)
    assert len(open(args.ood_list).read().splitlines()) == 3
    os.remove(args.ood_list)
    args.mine_th = 1.0
    with pytest.raises(InputError, match="kept no candidate.*lower --mine_th"):
        mine_ood.run(args)
    assert not os.path.exists(args.ood_list)


def test_mine_ood_bad_input(pool, tmp_path):
    args, names, _ = pool
    args.ood_pool_list = str(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="missing.txt"):
        mine_ood.run(args)
    (tmp_path / "empty.txt").write_text("\n")
    args.ood_pool_list = str(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="is empty"):
        mine_ood.run(args)
    args.ood_pool_list = str(tmp_path / "candidates.txt")
    args.mine_exclude = str(tmp_path / "no_exclude.txt")
    with pytest.raises(InputError, match="no_exclude.txt"):
        mine_ood.run(args)
    args.mine_exclude = None
    with open(os.path.join(args.ood_pool_root, names[3]), "wb") as f:
        f.write(b"broken")
    with pytest.raises(InputError, match=f"cannot read image .*{names[3]}"):
        mine_ood.run(args)
    assert not os.path.exists(args.ood_list)
