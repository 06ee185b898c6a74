"""The pictures of a run (data functions against hand-computed values, files as valid PNGs from the
right sources) and the TensorBoard events of `--set tensorboard=true`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from train import checkpoint, metrics
from train.plots import (count_bands, curve_data, draw_curves, draw_per_class, draw_weight_norms,
                         per_class_data, weight_norm_data)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_per_class_data_keeps_evaluated_classes_and_groups_by_training_count():
    counts = [500, 150, 60, 30, 10, 3]
    data = per_class_data([90.0, 80.0, None, 10.0, 5.0, 50.0], counts)
    assert data["classes"].tolist() == [0, 1, 3, 4, 5]  # class 2 has no evaluation images
    assert data["counts"].tolist() == [500, 150, 30, 10, 3]
    assert data["accuracy"].tolist() == [90.0, 80.0, 10.0, 5.0, 50.0]
    # many > 100, medium 20-100, few < 20; each group the mean of its evaluated classes
    assert data["group_means"] == {"many": 85.0, "medium": 10.0, "few": 27.5}
    assert [b[0] for b in data["bands"]] == ["few", "medium", "many"]
    with pytest.raises(ValueError, match="6 classes"):
        per_class_data([1.0], counts)


def test_count_bands_put_threshold_classes_inside_their_band():
    bands = {name: (lo, hi) for name, lo, hi in count_bands([100, 20, 19])}
    assert set(bands) == {"medium", "few"}  # no class has more than 100 images
    assert bands["medium"][0] < 20 < 100 < bands["medium"][1]
    assert bands["few"][0] < 19 < bands["few"][1] < 20


def _saved(weight_rows, centroids=None):
    state = {"net": {"classifier.weight": torch.tensor(weight_rows, dtype=torch.float32)}}
    if centroids is not None:
        state["centroids"] = torch.tensor(centroids, dtype=torch.float32)
    return state


def test_weight_norm_data_orders_classes_by_count_and_reads_each_stage():
    counts = [5, 50, 500]  # class 2 is the head
    stage1 = _saved([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]],
                    centroids=[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    final = _saved([[0.0, 2.0], [1.0, 0.0], [0.0, 0.5]])
    data = weight_norm_data(counts, stage1, final)
    assert data["order"].tolist() == [2, 1, 0] and data["counts"].tolist() == [500, 50, 5]
    np.testing.assert_allclose(data["stage1"], [10.0, 1.0, 5.0])
    np.testing.assert_allclose(data["stage2"], [0.5, 1.0, 2.0])
    np.testing.assert_allclose(data["centroid_norm"], [1.0, 1.0, 1.0])
    # cosines: c0·c1 = 0.6, c0·c2 = 0, c1·c2 = 0.8 -> nearest: c2 0.8, c1 0.8, c0 0.6
    np.testing.assert_allclose(data["centroid_nearest_cos"], [0.8, 0.8, 0.6])


def test_weight_norm_data_without_centroids_or_final_model():
    ce = weight_norm_data([3, 1], _saved([[1.0], [2.0]], centroids=[[0.0], [0.0]]), None)
    assert ce["centroid_nearest_cos"] is None and ce["stage2"] is None  # a CE run: centroids never moved
    old = weight_norm_data([3, 1], _saved([[1.0], [2.0]]), None)  # a stage1.pt without centroids
    assert old["centroid_norm"] is None
    unseen = weight_norm_data([3, 2, 1], _saved([[1.0]] * 3, centroids=[[1.0, 0], [0, 1.0], [0, 0]]), None)
    assert unseen["centroid_norm"].tolist() == [1.0, 1.0, 0.0]
    assert unseen["centroid_nearest_cos"][:2].tolist() == [0.0, 0.0] and math.isnan(unseen["centroid_nearest_cos"][2])


def test_curve_data_places_both_stages_on_one_epoch_axis_and_keeps_the_last_resumed_record():
    records = [
        {"stage": "stage1", "epoch": 0, "step": 2, "steps": 4, "loss": 3.0, "lr": 0.1},
        {"stage": "stage1", "epoch": 0, "step": 4, "steps": 4, "loss": 2.0, "lr": 0.1},
        {"stage": "stage1", "event": "epoch", "epoch": 0, "loss": 2.5},
        {"stage": "stage1", "epoch": 1, "step": 2, "steps": 4, "loss": 9.0, "lr": 0.01},  # then killed
        {"stage": "stage1", "epoch": 1, "step": 2, "steps": 4, "loss": 1.5, "lr": 0.01},  # resumed
        {"stage": "stage1", "epoch": 1, "step": 4, "steps": 4, "loss": "nan", "lr": 0.01},
        {"stage": "stage1", "event": "eval", "epoch": 1, "top1": 40.0, "many": 50.0, "medium": None, "few": 10.0},
        {"stage": "stage1", "event": "centroid_check", "max_rank_difference": 0.0},
        {"stage": "stage2", "epoch": 0, "step": 3, "loss": 0.5, "lr": 0.001},  # an older log: no "steps"
        {"stage": "stage2", "epoch": 0, "step": 6, "loss": 0.4, "lr": 0.0},
        {"stage": "stage2", "event": "eval", "epoch": 0, "top1": 45.0, "many": 40.0, "medium": None, "few": 30.0},
    ]
    data = curve_data(records)
    assert data["stage2_start"] == 2.0
    s1 = data["steps"]["stage1"]
    assert s1["x"] == [0.5, 1.0, 1.5, 2.0] and s1["loss"][:3] == [3.0, 2.0, 1.5] and math.isnan(s1["loss"][3])
    assert data["steps"]["stage2"]["x"] == [2.5, 3.0]  # step 3 of 6, inferred from the last step logged
    assert data["steps"]["stage2"]["lr"] == [0.001, 0.0]
    assert data["epochs"]["stage1"] == {"x": [1.0], "loss": [2.5]}
    assert data["evals"]["stage1"]["x"] == [2.0] and data["evals"]["stage2"]["x"] == [3.0]
    assert data["evals"]["stage2"]["few"] == [30.0] and math.isnan(data["evals"]["stage2"]["medium"][0])
    assert curve_data([])["stage2_start"] is None


def test_drawing_writes_valid_pngs_from_the_data(tmp_path):
    counts = [500, 150, 60, 30, 10, 3]
    draw_per_class(per_class_data([90, 80, None, 10, 5, 50], counts), tmp_path / "per_class.png", "test")
    final = _saved(np.ones((6, 4)).tolist())
    stage1 = _saved(np.ones((6, 4)).tolist(), centroids=np.eye(6, 4).tolist())
    draw_weight_norms(weight_norm_data(counts, stage1, final), tmp_path / "weight_norms.png")
    draw_weight_norms(weight_norm_data(counts, _saved(np.ones((6, 4)).tolist()), None), tmp_path / "w1.png")
    draw_curves(curve_data([]), tmp_path / "empty_curves.png")  # no metrics yet: an empty but valid picture
    for name in ("per_class.png", "weight_norms.png", "w1.png", "empty_curves.png"):
        _assert_png(tmp_path / name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically


@pytest.mark.slow
def test_a_finished_run_has_its_pictures_from_the_right_sources(tiny_trained_run, monkeypatch):
    run = tiny_trained_run["run"]
    for name in ("per_class.png", "weight_norms.png", "curves.png"):
        _assert_png(run / name)
    stage1, final = checkpoint.load(run / "stage1.pt"), checkpoint.load(run / "final.pt")
    assert stage1["centroids"].shape == (4, 64)  # the centroid bank is saved with the stage-1 model
    np.testing.assert_allclose(stage1["centroids"].norm(dim=1).numpy(), 1.0, atol=1e-5)
    # `iccl eval` redraws them, from its own evaluation, the saved models and metrics.jsonl
    import train.plots as plots
    seen = {}

    def recording(name):
        original = getattr(plots, name)

        def draw(data, path, *args):
            seen[name] = data
            return original(data, path, *args)
        return draw

    for name in ("draw_per_class", "draw_weight_norms", "draw_curves"):
        monkeypatch.setattr(plots, name, recording(name))
    for name in ("per_class.png", "weight_norms.png", "curves.png"):
        (run / name).unlink()
    from train.runner import evaluate_run
    result = evaluate_run(run)
    for name in ("per_class.png", "weight_norms.png", "curves.png"):
        _assert_png(run / name)
    counts = [24, 12, 8, 4]
    assert seen["draw_per_class"]["accuracy"].tolist() == [a for a in result["per_class"] if a is not None]
    assert seen["draw_per_class"]["counts"].tolist() == counts
    w = seen["draw_weight_norms"]
    np.testing.assert_allclose(w["stage1"], stage1["net"]["classifier.weight"].norm(dim=1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(w["stage2"], final["net"]["classifier.weight"].norm(dim=1).numpy(), rtol=1e-6)
    logged = [r for r in metrics.read(run / "metrics.jsonl") if r.get("event") is None and "step" in r]
    curves = seen["draw_curves"]["steps"]
    assert curves["stage1"]["loss"] == [r["loss"] for r in logged if r["stage"] == "stage1"]
    assert len(curves["stage2"]["x"]) == sum(r["stage"] == "stage2" for r in logged)


@pytest.mark.slow
def test_tensorboard_events_hold_the_logged_metrics(tiny_trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tiny_trained_run["run"]
    assert json.loads((run / "config.json").read_text())["tensorboard"] is True
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"stage1/loss", "stage1/lr", "stage1/epoch_loss", "stage1/eval/top1", "stage2/loss",
            "stage2/eval/few"} <= tags
    records = metrics.read(run / "metrics.jsonl")
    steps = [r for r in records if r["stage"] == "stage1" and r.get("event") is None and "step" in r]
    logged = events.Scalars("stage1/loss")
    assert [e.step for e in logged] == [r["epoch"] * r["steps"] + r["step"] for r in steps]
    np.testing.assert_allclose([e.value for e in logged], [r["loss"] for r in steps], rtol=1e-6)
    final_eval = [r for r in records if r["stage"] == "stage2" and r.get("event") == "eval"][-1]
    top1 = events.Scalars("stage2/eval/top1")[-1]
    assert top1.step == final_eval["epoch"] + 1 and top1.value == pytest.approx(final_eval["top1"], rel=1e-6)
