"""`iccl predict` and `iccl export` on a tiny trained run: exact agreement with the evaluation on a
converted split, probabilities against an independent fp32 forward, unreadable files reported and
skipped, and the export reproducing `iccl predict` in a fresh process that cannot import the project."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import K, make_converted, random_images
from model.network import build_network
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.format import INDEX_FILE
from tools.cli import main as cli
from train import checkpoint
from train.config import Config
from train.context import build_context
from train.predict import predict, read_image
from train.runner import evaluate_run, predictor, prepare

pytestmark = pytest.mark.slow  # one tiny training run (~10-40 s on 2 busy cores) shared by the module


@pytest.fixture(scope="module")
def run(tiny_trained_run):
    return tiny_trained_run


def _eval_argmax(run_dir) -> np.ndarray:
    """The evaluation's own predictions: `predictor` over the run's eval loader, as `run_eval` does."""
    saved = checkpoint.load(run_dir / "final.pt")
    cfg = Config.from_dict(saved["config"])
    ctx = build_context(cfg, run_dir)
    try:
        net = prepare(build_network(cfg.arch, K, cfg.proj_dim, cfg.proj_hidden), ctx)
        net.load_state_dict(saved["net"])
        net.eval()
        predict_fn = predictor(ctx, net)
        return torch.cat([predict_fn(x).argmax(1).cpu() for x, *_ in ctx.eval_batches()]).numpy()
    finally:
        ctx.close()


def test_predict_on_a_converted_split_agrees_exactly_with_eval(run):
    rows = predict(run["run"], [run["data"] / "test"], top_k=K)
    classes = [f"class_{k}" for k in range(K)]
    top1 = np.array([classes.index(r.classes[0]) for r in rows])
    assert [r.sample for r in rows] == list(range(16))
    assert np.array_equal(top1, _eval_argmax(run["run"]))
    # and so the accuracy per class is the one `iccl eval` reports
    labels = np.arange(16) % K
    per_class = [100.0 * float(np.mean(top1[labels == k] == k)) for k in range(K)]
    assert per_class == pytest.approx(evaluate_run(run["run"])["per_class"], abs=1e-3)
    assert [r.label for r in rows] == [classes[k] for k in labels]
    for r in rows:  # all K classes, probabilities sorted and summing to 1
        assert r.error is None and len(r.classes) == K and sorted(r.classes) == classes
        assert r.probs == sorted(r.probs, reverse=True) and sum(r.probs) == pytest.approx(1.0, abs=1e-5)
    # the dataset folder alone means its evaluation split
    again = predict(run["run"], [run["data"]], top_k=K)
    assert [(r.classes, r.probs) for r in again] == [(r.classes, r.probs) for r in rows]


def _reference_probs(run_dir, pixels_hwc: np.ndarray) -> np.ndarray:
    """Softmax of an fp32 forward of the saved network on (x/255 − mean)/std, computed here in
    float64 from the config's numbers (not through the project's normalisation)."""
    saved = checkpoint.load(run_dir / "final.pt")
    cfg = saved["config"]
    net = build_network(cfg["arch"], K, cfg["proj_dim"], cfg["proj_hidden"]).eval()
    net.load_state_dict(saved["net"])
    x = (pixels_hwc.astype(np.float64) / 255.0 - np.array(cfg["mean"])) / np.array(cfg["std"])
    x = torch.from_numpy(x).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return torch.softmax(net.classifier(net.encoder(x)), dim=1)[0].numpy()


def test_eval_split_evaluates_another_split_of_the_data(run, capsys):
    """`iccl eval --split NAME`: the same model on another split; a split the data lack is refused
    in one line that names the way out."""
    from train.runner import evaluate_run
    on_train = evaluate_run(run["run"], split="train")
    assert on_train["num_samples"] == len(ShardedSplit(run["data"], "train"))
    assert evaluate_run(run["run"])["num_samples"] == 16  # the run's own eval split, test
    assert cli(["-q", "eval", "--run", str(run["run"]), "--split", "nope"]) == 2
    assert "iccl eval --split NAME" in capsys.readouterr().err


def test_predict_files_and_folders_with_an_unreadable_file(run):
    photos = run["photos"]
    rows = predict(run["run"], [photos], top_k=2, amp="fp32", batch_size=2)
    names = [os.path.relpath(r.path, photos) for r in rows]
    assert names == ["a.png", "b/nested/c.png", "broken.jpg", "wide.jpg"]  # sorted, hidden and .txt skipped
    broken = rows[2]
    assert broken.classes == [] and "broken.jpg" in broken.error and broken.sample is None
    # the 48x40 JPEG: shorter side 40 -> 32 (bilinear), long side int(32 * 48 / 40) = 38, centre crop
    with Image.open(photos / "wide.jpg") as im:
        wide = np.asarray(im.convert("RGB").resize((38, 32), Image.BILINEAR))[:, 3:35]
    expected = {"a.png": np.asarray(Image.open(photos / "a.png").convert("RGB")), "wide.jpg": wide}
    for row, name in ((rows[0], "a.png"), (rows[3], "wide.jpg")):
        ref = _reference_probs(run["run"], expected[name])
        order = np.argsort(-ref)[:2]
        assert row.classes == [f"class_{k}" for k in order]
        np.testing.assert_allclose(row.probs, ref[order], atol=1e-5)
    # one file on its own gives the same numbers as inside a folder
    alone = predict(run["run"], [photos / "wide.jpg"], top_k=2, amp="fp32")
    np.testing.assert_allclose(alone[0].probs, rows[3].probs, atol=1e-6)


def test_predict_reports_a_corrupt_sample_of_a_split_and_goes_on(run, tmp_path):
    """A sample whose stored bytes do not decode gets an error row; the others keep their numbers."""
    bad = make_converted(tmp_path / "bad", {
        "train": (random_images(8, 32, seed=1), np.arange(8) % K),
        "test": (random_images(16, 32, seed=2), np.arange(16) % K)}, K)
    row = np.load(bad / "test" / INDEX_FILE)[5]
    shard = bad / "test" / f"shard-{int(row['shard']):06d}.tar"
    raw = bytearray(shard.read_bytes())
    raw[int(row["offset"]):int(row["offset"]) + int(row["size"])] = b"\0" * int(row["size"])
    shard.write_bytes(bytes(raw))
    good = predict(run["run"], [run["data"] / "test"], top_k=K)
    rows = predict(run["run"], [bad / "test"], top_k=K)
    assert len(rows) == 16 and rows[5].error and rows[5].classes == [] and rows[5].label == "class_1"
    for i in set(range(16)) - {5}:
        assert rows[i].sample == i and rows[i].classes == good[i].classes
        np.testing.assert_allclose(rows[i].probs, good[i].probs, atol=1e-6)


def test_read_image_applies_the_exif_orientation(tmp_path):
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :10] = 255  # a white left third
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    upright = read_image(tmp_path / "r.jpg")
    assert upright.shape == (30, 20, 3)
    assert upright[:10].mean() > 200 and upright[-10:].mean() < 50  # the white third is now on top


def test_cli_predict_writes_csv_and_json_and_refuses_bad_requests(run, tmp_path, capsys):
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    assert cli(["-q", "predict", "--run", str(run["run"]), str(run["photos"]), "--top-k", "3",
                "--out", str(out_csv)]) == 1  # a finding: one unreadable image, its row says why
    with open(out_csv) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["path", "sample", "label", "class_1", "prob_1", "class_2", "prob_2",
                              "class_3", "prob_3", "error"]
    assert len(table) == 4 and table[2]["error"] and not table[2]["class_1"]
    assert cli(["-q", "predict", "--run", str(run["run"]), str(run["data"] / "test"), "--out", str(out_json)]) == 0
    records = json.loads(out_json.read_text())
    assert len(records) == 16 and records[0]["sample"] == 0 and len(records[0]["top"]) == K
    capsys.readouterr()
    for args, message in (([str(run["photos"]), "--out", str(tmp_path / "p.txt")], "csv or .json"),
                          ([str(tmp_path / "missing.jpg")], "no such file"),
                          ([str(tmp_path)], "no images"),
                          ([str(run["photos"]), "--top-k", "0"], "top-k"),
                          ([str(run["photos"] / "broken.jpg")], "none of the 1 images could be read")):
        assert cli(["-q", "predict", "--run", str(run["run"])] + args) == 2
        assert message in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run["run"] / "config.json").read_text())
    for command in (["predict", "--run", str(unfinished), str(run["photos"])],
                    ["export", "--run", str(unfinished), "--out", str(tmp_path / "e")]):
        assert cli(["-q"] + command) == 2
        assert "final.pt: missing" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# The fresh process: no site .pth files (an editable install of this project would put it on the
# path), site-packages appended by hand so that torch, numpy and pillow import, and the check that
# the project does not.
_FRESH = """
import runpy, sys, sysconfig
sys.path[:] = [p for p in sys.path if p] + list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
for name in ("pipeline", "model", "train", "tools"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"the project's package {name} is importable")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_export_runs_without_the_project_and_reproduces_predict(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli(["-q", "export", "--run", str(run["run"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "classes.json", "model.pt2",
                                                     "model.safetensors", "predict.py", "transform.json"]
    cfg = json.loads((run["run"] / "config.json").read_text())
    transform = json.loads((out / "transform.json").read_text())
    assert (transform["resize"], transform["crop"]) == (cfg["eval_resize"], cfg["image_size"])
    assert transform["mean"] == cfg["mean"] and transform["std"] == cfg["std"]
    assert json.loads((out / "classes.json").read_text()) == [f"class_{k}" for k in range(K)]
    from safetensors.torch import load_file
    weights, saved = load_file(out / "model.safetensors"), checkpoint.load(run["run"] / "final.pt")["net"]
    assert set(weights) == set(saved) and all(torch.equal(weights[k], saved[k]) for k in saved)

    files = [run["photos"] / n for n in ("a.png", "wide.jpg", "b/nested/c.png", "broken.jpg")]
    expected = predict(run["run"], files, top_k=3, amp="fp32")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", _FRESH, str(out / "predict.py"), *map(str, files),
                           "--top-k", "3", "--json"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr  # broken.jpg: a finding
    got = [json.loads(line) for line in done.stdout.splitlines()]
    assert [g["path"] for g in got] == [str(f) for f in files]
    for g, e in zip(got, expected):
        if e.error:
            assert "error" in g
            continue
        assert [t["class"] for t in g["top"]] == e.classes
        np.testing.assert_allclose([t["prob"] for t in g["top"]], e.probs, atol=1e-5)

    # a folder stands for its images, sorted as `iccl predict` lists them; status 1: one was unreadable
    done = subprocess.run([sys.executable, "-S", "-c", _FRESH, str(out / "predict.py"), str(run["photos"]),
                           "--json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    listed = [json.loads(line)["path"] for line in done.stdout.splitlines()]
    assert listed == [r.path for r in predict(run["run"], [run["photos"]], top_k=1, amp="fp32")]
    done = subprocess.run([sys.executable, "-S", "-c", _FRESH, str(out / "predict.py"),
                           str(run["photos"] / "broken.jpg")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "none of the 1 images" in done.stderr
    from pipeline.sources.folder import IMAGE_EXTENSIONS
    from train.standalone_predict import IMAGE_SUFFIXES
    assert IMAGE_SUFFIXES == IMAGE_EXTENSIONS

    # an existing export is kept unless --force; --force replaces it whole
    capsys.readouterr()
    assert cli(["-q", "export", "--run", str(run["run"]), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    (out / "stale.txt").write_text("from before")
    assert cli(["-q", "export", "--run", str(run["run"]), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.pt2").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_export_program_takes_any_batch_size(run, tmp_path):
    from train.export import export_run
    out = export_run(run["run"], tmp_path / "e")
    program = torch.export.load(str(out / "model.pt2")).module()
    x = torch.rand(5, 3, 32, 32) * 255
    full = program(x)
    assert full.shape == (5, K)
    torch.testing.assert_close(program(x[:1]), full[:1], atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="--force"):
        export_run(run["run"], out)


def test_output_places_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    from tools.cli import main
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r"  # need not exist: the places are refused first
    for out in (".", str(tmp_path), str(run), str(run.parent)):
        assert main(["export", "--run", str(run), "--out", out, "--force"]) == 2
        assert "which an export never replaces" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), "x.jpg", "--out", str(tmp_path / "missing" / "p.csv")]) == 2
    assert "is not a folder this user can write to" in capsys.readouterr().err


def test_csv_keeps_class_names_from_non_utf8_folder_names(tmp_path):
    from train.predict import Row, write_rows
    name = b"bad\xff\xfename".decode("utf-8", "surrogateescape")  # as os.listdir gives it
    write_rows([Row(path="a.jpg", classes=[name, "cat"], probs=[0.75, 0.25])], 5, tmp_path / "p.csv")
    data = (tmp_path / "p.csv").read_bytes()
    assert b"bad\xff\xfename,0.75,cat,0.25" in data and data.count(b"\n") == 2


def test_seeds_folders_are_named_as_such_by_predict_export_and_stage2(tmp_path, capsys):
    from tools.cli import main
    from train.inference import resume_target
    seeds = tmp_path / "seeds"
    (seeds / "seed-3").mkdir(parents=True)
    (seeds / "seeds.json").write_text('{"seeds": [3], "options": {}}')
    assert resume_target(seeds / "seed-3") == seeds and resume_target(tmp_path / "x") == tmp_path / "x"
    for argv in (["predict", "--run", str(seeds), "a.jpg"], ["export", "--run", str(seeds), "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        assert f"a --seeds folder, one run per seed; pass one of them, e.g. {seeds / 'seed-3'}" in capsys.readouterr().err
    assert main(["stage2", "--from", str(seeds), "--out", str(tmp_path / "s2"), "--set", "stage2=lws"]) == 2
    assert "a --seeds folder; pass --choices CHOICE" in capsys.readouterr().err
    assert main(["stage2", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "s2"), "--set", "stage2=lws"]) == 2
    assert "no such folder" in capsys.readouterr().err
