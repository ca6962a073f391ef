"""wood/review.py and the review page mine_ood writes (docs/review.md): the pure parts directly, then the page in
a real headless Chromium (Selenium) on a tiny ToyVOC pool: the images load, keys mark, a reload keeps the marks,
a loaded file replaces them, and Export downloads the file that `run_sample.py ... --mine_exclude` reads and
that drops exactly the marked candidates.

The browser test is skipped only when no Chromium / chromedriver is found (.ci/run installs Debian's).
With WOOD_SCREENSHOT=<file.png> it also saves a screenshot of the page (docs/img/ood_review.png is made so:
`WOOD_SCREENSHOT=docs/img/ood_review.png python -m pytest -q tests/test_ood_review.py`).
"""
import io
import json
import os
import shlex
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import run_sample
from fakevoc import driver_args, random_bn_statistics
from misc.cam import cam_maps, normalise_per_class
from misc.utils import InputError, atomic_path, save_torch
from net.resnet50_cam import CAM, Net
from step import mine_ood
from toy import toyvoc
from voc12.dataloader import CAT_LIST
from wood import review
from wood.data import OoDFeatureDataset
from wood.mining import select_hard_ood

torch.set_num_threads(1)  # the test machine's 2 cores are shared: more threads only contend

CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 10                # longest wait for the browser (page load, download)
SCREENSHOT_COLOURS = 128   # the saved screenshot is a palette PNG: small enough to commit
SCREENSHOT_WINDOW = (1280, 1150)   # the browser window: the whole tiny page fits


# ------------------------------------------------------------------------------------------ pure parts

def test_jet_colours_and_blend():
    colours = review.jet_colours([0.0, 0.25, 0.5, 0.75, 1.0, -1.0, 2.0])
    assert colours.tolist() == [[0, 0, 128], [0, 128, 255], [128, 255, 128], [255, 128, 0], [128, 0, 0],
                                [0, 0, 128], [128, 0, 0]]
    rgb = np.full((2, 3, 3), 100, np.uint8)
    cam = np.array([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    out = review.blend_overlay(rgb, cam)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [50, 50, 114] and out[0, 1].tolist() == [114, 50, 50]
    assert out[0, 2].tolist() == [114, 178, 114]  # 50 + 64, 50 + 127.5 rounded half to even, 50 + 64
    with pytest.raises(ValueError, match="differ in size"):
        review.blend_overlay(rgb, cam[:, :2])


def test_shown_order_kept_excluded_over_cap_then_below():
    scores = [0.2, 0.9, 0.6, 0.95, 0.1, 0.6, 0.3]
    _, reasons = select_hard_ood(scores, 0.5, [False, False, False, True, False, False, False], max_keep=2)
    assert reasons == ["below_threshold", "kept", "kept", "excluded", "below_threshold", "over_cap",
                       "below_threshold"]
    assert review.shown_order(scores, reasons, 2) == [3, 1, 2, 5, 6, 0]
    assert review.shown_order(scores, reasons, 0) == [3, 1, 2, 5]
    assert review.shown_order(scores, reasons, 10) == [3, 1, 2, 5, 6, 0, 4]


def test_render_page_escapes_script_end():
    template = "<script>const DATA = /*REVIEW_DATA*/null;</script>"
    html = review.render_page(template, {"path": "a</script><b>.jpg"})
    assert html == '<script>const DATA = {"path": "a<\\/script><b>.jpg"};</script>'
    assert json.loads(html[len("<script>const DATA = "):-len(";</script>")]) == {"path": "a</script><b>.jpg"}
    with pytest.raises(ValueError, match="exactly once"):
        review.render_page("<p>no data</p>", {})


def test_storage_key_and_card_stem():
    key = review.storage_key("sha256:aaa", "sha256:bbb")
    assert key.startswith("wood-ood-review:") and key == review.storage_key("sha256:aaa", "sha256:bbb")
    assert key != review.storage_key("sha256:aaa", "sha256:bbc") != review.storage_key("sha256:aab", "sha256:bbb")
    stem = review.card_stem("images/a b/ø.jpg")
    assert len(stem) == 16 and set(stem) <= set("0123456789abcdef") and stem != review.card_stem("images/a.jpg")


def test_remine_command_parses_back_to_the_same_mining(tmp_path):
    args = driver_args(tmp_path / "work", cam_weights_name="sess/my cam.pth", ood_pool_root="pool",
                       ood_pool_list="pool/candidates.txt", ood_list="work/ood_list.txt", mine_th=0.25,
                       mine_max_keep=7, backbone_width=8, ood_long_side=96)
    command = review.remine_command(args, "my exclusions.txt")
    assert command.startswith("python run_sample.py --preset paper ")
    assert "'my exclusions.txt'" in command and "'sess/my cam.pth'" in command
    again = run_sample.parse_args(shlex.split(command)[2:])
    for name in ["work_dir", "cam_weights_name", "ood_pool_root", "ood_pool_list", "ood_list", "mine_th",
                 "mine_max_keep", "backbone_width", "ood_long_side"]:
        assert getattr(again, name) == getattr(args, name), name
    assert again.mine_exclude == "my exclusions.txt" and again.mine_ood_pass and again.overwrite


def test_overlay_is_the_cam_of_misc_cam_at_one_scale(tmp_path):
    torch.manual_seed(0)
    model = random_bn_statistics(CAM(pretrained="none", width=8, frozen_bn=True, detach_stage2=False)).eval()
    rgb = np.random.default_rng(0).integers(0, 256, (50, 30, 3)).astype(np.uint8)
    scored = review.resize_long(rgb, 64)
    assert scored.shape == (64, 38, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    # the network input is mine_ood's (OoDFeatureDataset) and its flip
    pair = review.flip_pair(scored)
    assert np.array_equal(pair[0], OoDFeatureDataset(str(tmp_path), ["a.png"], long_side=64)[0]["img"])
    assert np.array_equal(pair[1], pair[0][:, :, ::-1])
    cam = review.top_class_cam(model, scored, 7, torch.device("cpu"))
    with torch.inference_mode():
        _, high_res = cam_maps(model, [pair], (64, 38))
    expected = normalise_per_class(high_res[7]).numpy()
    assert cam.shape == (64, 38) and np.allclose(cam, expected, atol=1e-6)
    assert cam.max() == pytest.approx(1.0, abs=1e-4) and cam.min() >= 0


# ------------------------------------------------------------------------------------ the page, end to end

# (target logit, class) per pool image: 6 above --mine_th 0.5 (logit > 0), 6 below, three top classes
TARGETS = [(3.0, "cat"), (-0.4, "dog"), (2.5, "dog"), (1.5, "car"), (-1.2, "cat"), (2.0, "cat"),
           (-0.2, "car"), (0.5, "dog"), (-0.8, "dog"), (1.0, "car"), (-0.6, "cat"), (-1.0, "car")]
OTHER_LOGIT = -4.0
REVIEW_BELOW = 3


def classifier_with_scores(pool_root, paths, long_side):
    """A width-8 net whose classifier is solved so that image i gets exactly TARGETS[i]'s logit for its class
    (OTHER_LOGIT elsewhere): scores and top classes known in advance (random backbone, frozen BN)."""
    torch.manual_seed(0)
    net = random_bn_statistics(Net(pretrained="none", width=8, frozen_bn=True, detach_stage2=False)).eval()
    dataset = OoDFeatureDataset(pool_root, paths, long_side=long_side)
    with torch.no_grad():
        features = torch.cat([net.feature_list(torch.from_numpy(dataset[i]["img"])[None])[1][-1]
                              for i in range(len(paths))]).double()                      # (N, D)
    logits = torch.full((len(paths), len(CAT_LIST)), OTHER_LOGIT, dtype=torch.float64)
    for i, (logit, cls) in enumerate(TARGETS):
        logits[i, CAT_LIST.index(cls)] = logit
    weight = (torch.linalg.pinv(features) @ logits).T                                   # (C, D): W f_i = logits_i
    with torch.no_grad():
        net.classifier.weight.copy_(weight.float()[:, :, None, None])
    return net


@pytest.fixture
def mined(tmp_path):
    """A mining of a 12-candidate ToyVOC pool with known scores: (driver args, candidate paths, scores)."""
    toy = toyvoc.parse_args(["--ood_out", str(tmp_path / "pool"), "--n_ood_hard", "6", "--n_ood_easy", "6",
                             "--long_min", "48", "--long_max", "64"])
    toyvoc.write_ood_set(toy)
    root, candidates = tmp_path / "pool", tmp_path / "pool" / "candidates.txt"
    paths = candidates.read_text().split()
    net = classifier_with_scores(str(root), paths, 64)
    save_torch(str(tmp_path / "cam.pth"), net.state_dict())
    args = driver_args(tmp_path / "work", device="cpu", num_workers=0, backbone_width=8,
                       cam_weights_name=str(tmp_path / "cam.pth"), ood_pool_root=str(root),
                       ood_pool_list=str(candidates), ood_root=str(root), ood_list=str(tmp_path / "work" / "ood.txt"),
                       ood_long_side=64, mine_th=0.5, review_below=REVIEW_BELOW)
    mine_ood.run(args)
    scores = [1 / (1 + np.exp(-logit)) for logit, _ in TARGETS]
    return args, paths, scores


def expected_cards(paths, scores):
    order = sorted(range(len(paths)), key=lambda i: -scores[i])
    above = [i for i in order if scores[i] > 0.5]
    return above + [i for i in order if scores[i] <= 0.5][:REVIEW_BELOW]


def test_review_files(mined):
    args, paths, scores = mined
    shown = expected_cards(paths, scores)
    assert open(args.ood_list).read().split() == [paths[i] for i in shown[:6]]
    html = open(os.path.join(args.work_dir, "ood_review.html"), encoding="utf-8").read()
    start = html.index("const DATA = ") + len("const DATA = ")
    data = json.loads(html[start:html.index(";\n", start)])
    assert [c["path"] for c in data["cards"]] == [paths[i] for i in shown]
    assert [c["score"] for c in data["cards"]] == pytest.approx([scores[i] for i in shown], abs=1e-5)
    assert [c["top_class"] for c in data["cards"]] == [TARGETS[i][1] for i in shown]
    assert [c["status"] for c in data["cards"]] == ["kept"] * 6 + ["below_threshold"] * 3
    assert data["counts"] == {"candidates": 12, "kept": 6, "excluded": 0, "over_cap": 0, "below_shown": 3,
                              "below_total": 6}
    assert data["exclusions"] == [] and data["threshold"] == 0.5 and data["classifier"] == args.cam_weights_name
    folder = os.path.join(args.work_dir, "ood_review")
    assert sorted(os.listdir(folder)) == sorted(f"{review.card_stem(paths[i])}{s}.jpg" for i in shown
                                                for s in ["", "_cam"])
    for card in data["cards"]:
        with Image.open(os.path.join(args.work_dir, card["image"])) as image, \
                Image.open(os.path.join(args.work_dir, card["overlay"])) as overlay:
            assert image.format == overlay.format == "JPEG" and image.size == overlay.size
            assert max(image.size) == review.THUMB_LONG_SIDE

    # a re-mine showing fewer cards removes the images it no longer shows, and nothing else
    open(os.path.join(folder, "notes.txt"), "w").write("mine\n")
    args.overwrite, args.review_below = True, 1
    mine_ood.run(args)
    assert sorted(os.listdir(folder)) == sorted(["notes.txt"] + [f"{review.card_stem(paths[i])}{s}.jpg"
                                                                 for i in shown[:7] for s in ["", "_cam"]])


def chrome(download_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={SCREENSHOT_WINDOW[0]},{SCREENSHOT_WINDOW[1]}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"waited {WAIT_S} s for {what}")


def page_state(driver):
    """(marked paths in page order, focused card index, visible card count) from the DOM."""
    return driver.execute_script("""
        const cards = [...document.querySelectorAll('.card')];
        return [cards.filter(c => c.classList.contains('marked')).map(c => c.dataset.path),
                cards.findIndex(c => c.classList.contains('focused')),
                cards.filter(c => getComputedStyle(c).display !== 'none').length];""")


def save_screenshot(driver, path):
    """The page from its top as a palette PNG (small enough to commit), written atomically."""
    driver.execute_script("window.scrollTo(0, 0)")
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    with atomic_path(path) as tmp:
        shot.quantize(colors=SCREENSHOT_COLOURS).save(tmp, format="PNG", optimize=True)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no Chromium / chromedriver (apt-get install -y "
                                                             "chromium chromium-driver)")
def test_review_page_in_a_browser(mined, tmp_path, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    args, paths, scores = mined
    shown = [paths[i] for i in expected_cards(paths, scores)]
    page_url = "file://" + os.path.abspath(os.path.join(args.work_dir, "ood_review.html"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chrome(downloads)
    try:
        def keys(text):
            ActionChains(driver).send_keys(text).perform()

        driver.get(page_url)
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert [c.get_attribute("data-path") for c in cards] == shown
        assert [c.find_element(By.CSS_SELECTOR, ".score").text for c in cards] == \
            [f"{scores[paths.index(p)]:.3f}" for p in shown]
        assert len(driver.find_elements(By.CSS_SELECTOR, ".card.greyed")) == REVIEW_BELOW
        facts = driver.find_element(By.ID, "facts").text
        assert args.cam_weights_name in facts and "--mine_th 0.5" in facts and "kept 6" in facts
        assert "one scale, 1.0" in driver.find_element(By.ID, "cam-note").text
        # every image decoded (a broken one has naturalWidth 0)
        wait_for(lambda: driver.execute_script("return [...document.images].every(i => i.complete)"), "images")
        widths = driver.execute_script("return [...document.images].map(i => i.naturalWidth)")
        assert len(widths) == 2 * len(shown) and min(widths) > 0

        # x marks and moves on, j / k move, u undoes the last change
        keys("x")
        keys("j")
        keys("xx")
        keys("u")
        keys("k")
        assert page_state(driver) == [[shown[0], shown[2]], 2, len(shown)]
        assert driver.find_element(By.ID, "counter").text.startswith("marked 2: 2 of the kept will be dropped")
        per_class = {s.get_attribute("data-cls"): s.text
                     for s in driver.find_elements(By.CSS_SELECTOR, "#class-counts span")}
        assert per_class == {"car": "car: 2 / 3 / 0", "cat": "cat: 2 / 3 / 2", "dog": "dog: 2 / 3 / 0"}

        # the class filter shows that class only, and the keys move within it
        Select(driver.find_element(By.ID, "class-filter")).select_by_value("car")
        car_cards = [i for i, p in enumerate(shown) if TARGETS[paths.index(p)][1] == "car"]
        assert page_state(driver)[1:] == [car_cards[0], 3] and len(car_cards) == 3
        keys("j")
        assert page_state(driver)[1] == car_cards[1]
        Select(driver.find_element(By.ID, "class-filter")).select_by_value("")
        assert page_state(driver)[2] == len(shown)

        # a click marks, a second one unmarks
        cards[4].click()
        assert page_state(driver)[:2] == [[shown[0], shown[2], shown[4]], 4]
        cards[4].click()
        assert page_state(driver)[0] == [shown[0], shown[2]]

        driver.refresh()  # the marks are in localStorage
        assert page_state(driver)[0] == [shown[0], shown[2]]

        # a loaded exclusion file replaces the marks (same format as --mine_exclude); u brings them back
        loaded = tmp_path / "other.txt"
        loaded.write_text(f"# a comment\n\n  {shown[1]}  \nnot/on/the/page.jpg\n")
        driver.find_element(By.ID, "load-file").send_keys(str(loaded))
        wait_for(lambda: page_state(driver)[0] == [shown[1]], "the loaded marks")
        assert "1 not on this page" in driver.find_element(By.ID, "counter").text
        keys("u")
        assert page_state(driver)[0] == [shown[0], shown[2]]

        if os.environ.get("WOOD_SCREENSHOT"):
            save_screenshot(driver, os.environ["WOOD_SCREENSHOT"])

        driver.find_element(By.ID, "export").click()
        exported = downloads / review.EXCLUDE_FILE_NAME
        wait_for(lambda: exported.is_file() and not list(downloads.glob("*.crdownload")), "the download")
        lines = exported.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[-2:] == sorted([shown[0], shown[2]])
        assert [line for line in lines if not line.startswith("#")] == sorted([shown[0], shown[2]])
        command = driver.find_element(By.ID, "command").text
        assert command == review.remine_command(args, os.path.join(args.work_dir, review.EXCLUDE_FILE_NAME))

        # the page's command, with the file where the page says: drops exactly the marked ones
        kept_before = open(args.ood_list).read().split()
        shutil.copy(exported, os.path.join(args.work_dir, review.EXCLUDE_FILE_NAME))
        words = shlex.split(command)[2:] + ["--device", "cpu", "--num_workers", "0"]
        capsys.readouterr()
        at = words.index("--overwrite")
        without_overwrite = words[:at] + words[at + 2:]
        assert run_sample.main(without_overwrite) == 2  # the list was made with another exclusion file
        assert "exclusions:" in capsys.readouterr().err and open(args.ood_list).read().split() == kept_before
        assert run_sample.main(words) == 0
        assert open(args.ood_list).read().split() == [p for p in kept_before if p not in (shown[0], shown[2])]
        assert f"2 excluded (listed in {os.path.join(args.work_dir, review.EXCLUDE_FILE_NAME)})" in \
            capsys.readouterr().out

        # the new page starts from that file, the same marks as the browser kept: no notice
        driver.get(page_url)
        assert page_state(driver)[0] == [shown[0], shown[2]]
        assert driver.find_element(By.ID, "notice").text == ""
        assert [c.text for c in driver.find_elements(By.CSS_SELECTOR, ".card.marked .badge:not(.mark-badge)")] == \
            ["excluded by the file"] * 2
    finally:
        driver.quit()


def test_the_driver_flag_review_below():
    assert run_sample.parse_args(["--device", "cpu"]).review_below == 50
    assert run_sample.parse_args(["--device", "cpu", "--review_below", "0"]).review_below == 0
    with pytest.raises(InputError, match="--review_below -1: must be an integer >= 0"):
        run_sample.parse_args(["--device", "cpu", "--review_below", "-1"])
