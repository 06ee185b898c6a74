"""What a user can get wrong around `iccl stage2` and its runs, and stops in the middle of it: each
fault ends in one line naming the setting or folder and the fix (exit 2) and writes nothing; a stop
during work that keeps no checkpoint exits 130 and the rerun does it again; a stopped search resumes
inside the candidate it stopped in and ends with the uninterrupted search's weights."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import make_converted, make_tiny_lt, random_images, tiny_config
from pipeline.atomic import write_json
from pipeline.errors import DataError
from tools.cli import main as cli
from train import checkpoint
from train.runner import check_resume_config, train

SPEED = ["--loader", "resident", "--workers", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An ICCL run on data with train (24 / 12 / 8 / 4), val (3 per class) and test, evaluated on
    val after stage 1 (so a stage 2 from it tuned on val starts with its feature pass)."""
    root = tmp_path_factory.mktemp("faults")
    train(tiny_config(make_tiny_lt(root / "data", val_per_class=3), amp="fp32", overrides={"val_split": "val"}),
          root / "iccl")
    return root


def _stage2(source, out, *sets, extra=(), quiet=True):
    args = ["-q"] * quiet + ["stage2", "--from", str(source), "--out", str(out), *SPEED, *extra]
    for s in sets:
        args += ["--set", s]
    return cli(args)


def test_faults_end_in_one_line_and_write_nothing(run, tmp_path, capsys):
    source = run / "iccl"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    (tmp_path / "family" / "crt").mkdir(parents=True)  # the --out of an earlier --choices
    (tmp_path / "arun").mkdir()
    write_json(tmp_path / "arun" / "config.json", {})
    cases = [
        (("stage2=tau_norm", "valsplit=val"), source, tmp_path / "a", (), "did you mean val_split"),
        (("stage2=crt",), run / "data", tmp_path / "b", (), "not a run directory"),
        (("stage2=crt",), source, tmp_path / "notes", (), "x.txt, not a run"),
        (("stage2=crt",), source, tmp_path / "family", (), "crt, not a run"),
        ((), source, tmp_path / "arun", ("--choices", "crt"), "holds a run; --choices"),
        (("stage2=crt",), source, tmp_path / "c", ("--data", str(tmp_path / "moved")),
         "pass --data NEW/PATH"),
    ]
    for sets, src, out, extra, message in cases:
        assert _stage2(src, out, *sets, extra=extra) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arun", "family", "notes"]
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["x.txt"]
    assert [p.name for p in (tmp_path / "family").iterdir()] == ["crt"]
    assert cli(["-q", "eval", "--run", str(source), "--data", str(tmp_path / "moved")]) == 2
    assert "pass --data NEW/PATH" in capsys.readouterr().err


def test_a_crop_larger_than_the_images_is_refused_and_the_corrected_run_starts(tmp_path):
    data = make_converted(tmp_path / "small", {"train": (random_images(16, 16), torch.arange(16).numpy() % 4),
                                               "test": (random_images(8, 16, seed=1), torch.arange(8).numpy() % 4)}, 4)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"image_size=32: a 32-px crop does not fit the 16x16 images.*"
                                        r"--set image_size=16 --set eval_resize=16"):
        train(tiny_config(data, epochs=1, warmup_epochs=0, batch_size=8), out)
    assert not out.exists()
    report = train(tiny_config(data, epochs=1, warmup_epochs=0, batch_size=8, s2_epochs=0,
                               overrides={"image_size": "16", "eval_resize": "16"}), out)
    assert report["stage1"]["num_samples"] == 8


def test_the_crop_check_reads_past_an_unreadable_first_image(tmp_path, monkeypatch):
    """A corrupt image is replaced in training, so the check takes the first size that reads."""
    from train.context import _check_crop
    sizes = iter([None, (16, 16)])
    monkeypatch.setattr("train.context.stored_size", lambda split, i: next(sizes))
    with pytest.raises(DataError, match="16x16 images"):
        _check_crop(tiny_config(make_tiny_lt(tmp_path / "d")), [0, 1])


@pytest.mark.parametrize("result", ["checkpoint.pt", "stage1.pt", "final.pt", "report.json"])
def test_settings_may_change_until_the_run_has_a_result(run, tmp_path, result):
    cfg = tiny_config(run / "data")
    out = tmp_path / "run"
    out.mkdir()
    write_json(out / "config.json", {**cfg.to_dict(), "lr": cfg.lr * 2})
    (out / "metrics.jsonl").write_text('{"stage": "stage1"}\n')
    write_json(out / "stage1_source.json", {"stage1": "elsewhere"})
    check_resume_config(out, cfg)  # nothing trained: the corrected command may start it
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # the attempt's log and source go
    (out / result).write_bytes(b"")
    with pytest.raises(DataError, match="holds a run with other settings"):
        check_resume_config(out, cfg)


def test_eval_on_the_val_split_is_refused_only_where_a_value_was_chosen_on_it(run, tmp_path, capsys):
    assert _stage2(run / "iccl", tmp_path / "crt", "stage2=crt", "val_split=val") == 0
    assert cli(["-q", "eval", "--run", str(tmp_path / "crt"), "--split", "val"]) == 0
    assert _stage2(run / "iccl", tmp_path / "la", "stage2=logit_adjust", "val_split=val") == 0
    assert cli(["-q", "eval", "--run", str(tmp_path / "la"), "--split", "val"]) == 2
    assert "chose its tau (s2_logit_adjust_grid) on this split" in capsys.readouterr().err
    assert cli(["-q", "eval", "--run", str(tmp_path / "la"), "--split", "val", "--stage", "1"]) == 0


def test_a_stop_during_a_choice_without_training_exits_130_and_the_rerun_finishes(run, tmp_path, monkeypatch,
                                                                                   capsys):
    out = tmp_path / "tau"
    monkeypatch.setattr("train.loop.stop_requested", lambda: "SIGINT")
    assert _stage2(run / "iccl", out, "stage2=tau_norm", "val_split=val", quiet=False) == 130
    assert "stopped during the features of the val split" in capsys.readouterr().err
    assert not (out / "final.pt").exists()
    monkeypatch.undo()
    assert _stage2(run / "iccl", out, "stage2=tau_norm", "val_split=val") == 0
    assert "tau_norm_p" in json.loads((out / "report.json").read_text())["stage2_choice"]["chosen"]


@pytest.mark.slow
@pytest.mark.parametrize("stop_in", [0.1, 0.3])
def test_a_stopped_search_resumes_inside_its_candidate_and_ends_as_if_never_stopped(run, tmp_path, monkeypatch,
                                                                                    stop_in):
    """Stopped inside the first candidate, the rerun's weights are the resumed candidate's (the
    two candidates tie on this tiny split, and a tie goes to the first); stopped inside the
    second, the finished first one is not trained again."""
    sets = ("stage2=mislas", "val_split=val", "s2_epochs=2", "s2_mislas_eps_head=0.1,0.3")
    assert _stage2(run / "iccl", tmp_path / "whole", *sets) == 0
    out = tmp_path / "stopped"

    def stop_inside(value):  # checkpoints are written every step (checkpoint_minutes=0)
        ckpt = out / "checkpoint.pt"
        return "SIGINT" if ckpt.is_file() and checkpoint.load(ckpt).get("search", {}).get("current") == value \
            else None

    monkeypatch.setattr("train.loop.stop_requested", lambda: stop_inside(stop_in))
    assert _stage2(run / "iccl", out, *sets) == 130
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["search"]["current"] == stop_in
    assert [v for v, _ in saved["search"]["scores"]] == ([] if stop_in == 0.1 else [0.1])
    assert (saved["epoch"], saved["step"]) != (0, 0)
    monkeypatch.undo()
    assert _stage2(run / "iccl", out, *sets) == 0
    whole, stopped = (checkpoint.load(d / "final.pt")["net"] for d in (tmp_path / "whole", out))
    assert all(torch.equal(whole[k], stopped[k]) for k in whole)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "epoch" for r in epochs) == 4  # 2 candidates x 2 epochs, none again
    reports = [json.loads((d / "report.json").read_text()) for d in (tmp_path / "whole", out)]
    assert reports[0]["stage2_choice"] == reports[1]["stage2_choice"]


def test_a_value_chosen_at_the_edge_of_its_grid_is_said():
    from train.stage2_methods import grid_edge_note
    grid = (0.0, 0.5, 1.0, 2.0)
    assert "largest value of s2_tau_norm_grid" in grid_edge_note("s2_tau_norm_grid", grid, 2.0)
    assert "smallest" in grid_edge_note("s2_tau_norm_grid", grid, 0.0)
    assert grid_edge_note("s2_tau_norm_grid", grid, 1.0) is None
    assert grid_edge_note("s2_mislas_eps_head", (0.1, 0.3), 0.3) is None  # two values: both edges


def _seeds_folder(run, root, seeds=(0, 1), listed=None):
    """A --seeds folder whose seed-S runs are copies of the module's run (seeds.json lists `listed`)."""
    import shutil
    for s in seeds:
        shutil.copytree(run / "iccl", root / f"seed-{s}")
    write_json(root / "seeds.json", {"seeds": list(listed if listed is not None else seeds)})
    return root


def test_choices_faults_end_in_one_line_and_write_nothing(run, tmp_path, capsys):
    """Every seed must have its stage 1; --out is a folder of its own; each choice once; every
    refusal of a --choices run is said at once."""
    unfinished = _seeds_folder(run, tmp_path / "unfinished")
    (unfinished / "seed-1" / "stage1.pt").unlink()
    unlisted = _seeds_folder(run, tmp_path / "unlisted", seeds=(0,), listed=(0, 2))
    complete = _seeds_folder(run, tmp_path / "complete", seeds=(0,))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    (tmp_path / "single-layout" / "crt").mkdir(parents=True)  # an earlier --choices from one run
    write_json(tmp_path / "single-layout" / "crt" / "config.json", {})
    (tmp_path / "other-from").mkdir()
    write_json(tmp_path / "other-from" / "summary.json", {"from": "/elsewhere"})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [
        (unfinished, tmp_path / "a", "crt", (), f"{unfinished / 'seed-1' / 'stage1.pt'}: missing"),
        (unlisted, tmp_path / "a", "crt", (), f"{unlisted / 'seed-2'}: missing; seeds.json lists seed-2"),
        (complete, complete, "crt", (), "is --from"),
        (complete, complete / "family", "crt", (), "is inside --from"),
        (complete / "seed-0", complete, "crt", (), "holds --from"),
        (complete, tmp_path / "single-layout", "crt", (), "holds one run, made from a single run"),
        (complete, tmp_path / "other-from", "crt", (), "holds the stage-2 choices of --from /elsewhere"),
        (complete, tmp_path / "a", ",", (), "--choices ',': choose among"),
        (complete, tmp_path / "afile", "crt", (), "a file; choose a folder"),
        (complete, tmp_path / "notes", "crt", (), "holds other files (x.txt)"),
        (complete, tmp_path / "a", "crt,ncm,crt", (), "crt given twice"),
        (complete, tmp_path / "a", "crt,tau_norm,logit_adjust", ("val_split=",),
         "stage2=logit_adjust chooses tau"),
    ]
    for src, out, choices, sets, message in cases:
        assert _stage2(src, out, *sets, extra=("--choices", choices)) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "stage2=tau_norm chooses" in err  # both tuned choices named in the one message
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_stage1_setting_given_as_the_run_has_it_is_accepted(run):
    from train.config import load_config_json
    from train.stage2_from import stage2_run_config
    epochs = load_config_json(run / "iccl" / "config.json").epochs
    cfg, _ = stage2_run_config(run / "iccl", {"stage2": "crt", "epochs": str(epochs), "lr_steps": "1"})
    assert cfg.stage2 == "crt" and cfg.epochs == epochs
    with pytest.raises(DataError, match="--set epochs: fixed by the stage 1"):
        stage2_run_config(run / "iccl", {"stage2": "crt", "epochs": str(epochs + 1)})


def test_seed_runs_are_taken_by_seed_number(tmp_path):
    from train.stage2_from import seed_runs
    for s in (10, 2, 0):
        (tmp_path / f"seed-{s}").mkdir()
        (tmp_path / f"seed-{s}" / "config.json").write_text("{}")
    (tmp_path / "seed-x").mkdir()  # not a run: no config.json
    assert [p.name for p in seed_runs(tmp_path)] == ["seed-0", "seed-2", "seed-10"]


def test_choices_from_one_seed_keep_the_seed_layout_and_write_their_table(run, tmp_path, capsys):
    """A folder of seeds gives OUT/CHOICE/seed-S even with one seed (more seeds later land beside
    it), OUT/summary.json holds the table and the tuned values, and the folders say what they are."""
    seeds = _seeds_folder(run, tmp_path / "seeds", seeds=(0,))
    assert _stage2(seeds, tmp_path / "fam", extra=("--choices", "tau_norm")) == 0
    assert _stage2(seeds, tmp_path / "fam", extra=("--choices", "ncm")) == 0  # added later: both in the table
    assert (tmp_path / "fam" / "ncm" / "seed-0" / "report.json").is_file()
    summary = json.loads((tmp_path / "fam" / "summary.json").read_text())
    assert summary["runs"] == ["seed-0"] and set(summary["stage2"]) == {"ncm", "tau_norm"}
    assert summary["stage2"]["ncm"]["n"] == 1
    assert list(summary["chosen"]) == ["tau_norm"] and list(summary["chosen"]["tau_norm"]) == ["seed-0"]
    report = json.loads((tmp_path / "fam" / "tau_norm" / "seed-0" / "report.json").read_text())
    assert summary["stage2"]["tau_norm"]["top1"] == round(report["stage2"]["top1"], 2)
    capsys.readouterr()
    assert cli(["-q", "eval", "--run", str(tmp_path / "fam")]) == 2
    err = capsys.readouterr().err
    assert f"it holds runs (e.g. {tmp_path / 'fam'}/" in err and "/seed-0): pass one of them" in err, err
    assert cli(["-q", "info", str(tmp_path / "fam" / "ncm" / "seed-0")]) == 2
    err = capsys.readouterr().err
    assert "holds a training run" in err and "iccl convert ... --out" not in err


def test_a_finished_run_is_not_taken_over_by_another_stage1(run, tmp_path, capsys):
    """A rerun into a finished stage-2 run from a stage 1 that changed since is refused: its
    results would be reported under the new stage 1."""
    import shutil
    source = tmp_path / "src"
    shutil.copytree(run / "iccl", source)
    assert _stage2(source, tmp_path / "ncm", "stage2=ncm") == 0
    state = torch.load(source / "stage1.pt", weights_only=True)
    torch.save({**state, "retrained": True}, source / "stage1.pt")  # another file, same settings
    capsys.readouterr()
    assert _stage2(source, tmp_path / "ncm", "stage2=ncm") == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (stage 1:" in err and "(another file)" in err, err
