"""Run configurations, run directories and the `coar` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from coarpy import runs
from coarpy.cli import main
from coarpy.errors import ConfigError
from coarpy.runs import RunConfig
from coarpy.store import ComponentDataset

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build(n_examples=12, width=4):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(width * 16, 3),
        ).eval()
        x = torch.randn(n_examples, 1, 4, 4, generator=g)
        y = torch.randint(0, 3, (n_examples,), generator=g)
        return {"model": model, "data": (x, y)}
    """
)


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    (tmp_path / "cfgfactory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "run.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            factory = "cfgfactory:build"
            path = "{tmp_path / "run"}"
            n_masks = 30
            alpha = 0.25
            block_size = 10
            kinds = ["conv"]

            [factory_args]
            n_examples = 12
            """
        )
    )
    return path


def test_config_round_trips_through_toml(config_file, tmp_path):
    cfg = RunConfig.load(config_file)
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert RunConfig.load(again) == cfg


def test_config_names_unknown_and_missing_fields(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('factory = "x:y"\npath = "r"\nn_masks = 3\nalpha = 0.1\nalfa = 2\n')
    with pytest.raises(ConfigError, match="unknown field.*alfa"):
        RunConfig.load(bad)
    bad.write_text('factory = "x:y"\npath = "r"\n')
    with pytest.raises(ConfigError, match="missing required field.*n_masks.*alpha"):
        RunConfig.load(bad)
    bad.write_text('factory = "x:y"\npath = "r"\nn_masks = "many"\nalpha = 0.1\n')
    with pytest.raises(ConfigError, match="n_masks should be int"):
        RunConfig.load(bad)


def test_collect_run_fills_the_store_and_saves_the_config(config_file, tmp_path):
    ds = runs.collect_run(config_file, progress=False)
    assert len(ds) == 30 and ds.n_examples == 12 and ds.n_components == 4
    assert runs.load_config(tmp_path / "run") == RunConfig.load(config_file)


def test_worker_shards_together_equal_one_run(config_file, tmp_path):
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, shard=(0, 2), progress=False)
    partial = ComponentDataset(cfg.path)
    assert partial.done_blocks() == [0, 2]
    assert main(["worker", cfg.path, "--shard", "1/2"]) == 0
    whole = runs.collect_run(
        RunConfig.from_dict({**_raw(cfg), "path": str(tmp_path / "whole")}), progress=False
    )
    assert torch.equal(ComponentDataset(cfg.path).outputs(), whole.outputs())


def _raw(cfg: RunConfig) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def test_status_reports_progress_as_text_and_json(config_file, tmp_path, capsys):
    runs.collect_run(config_file, shard=(0, 3), progress=False)
    run = str(tmp_path / "run")
    assert main(["status", run]) == 0
    text = capsys.readouterr().out
    assert "10 / 30" in text and "blocks 1 / 3" in text and "alpha=0.25" in text
    assert main(["status", run, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["done_rows"] == 10 and info["n_blocks"] == 3
    assert info["settings"]["n_components"] == 4


def test_cli_reports_library_errors_without_a_traceback(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "No component dataset" in capsys.readouterr().err


def test_a_factory_that_cannot_be_imported_is_a_config_error_not_a_traceback(config_file, capsys):
    config_file.write_text(config_file.read_text().replace("cfgfactory:build", "nomodule:build"))
    assert main(["collect", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coar collect: factory = 'nomodule:build': Cannot import module")


def test_collect_keeps_a_url_path_on_its_filesystem(config_file, tmp_path, monkeypatch):
    """Regression: `coar collect` once made ``memory://b/run`` a local folder ``memory:/b/run``."""
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://coar-cli-{tmp_path.name}/run"
    text = config_file.read_text().replace(f'path = "{tmp_path / "run"}"', f'path = "{url}"')
    config_file.write_text(text)
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["collect", str(config_file)]) == 0
        assert not (tmp_path / "memory:").exists()
        assert ComponentDataset(url).missing_blocks() == []
        assert runs.load_config(url) == RunConfig.load(config_file)  # saved next to the store
        assert main(["status", url]) == 0
    finally:
        fsspec.filesystem("memory").rm(f"/coar-cli-{tmp_path.name}", recursive=True)


def test_worker_command_keeps_the_configurations_prefix(config_file, tmp_path, capsys):
    """Regression: `coar worker` once dropped ``prefix`` and ``compile_model``."""
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, shard=(0, 3), progress=False)
    saved = tmp_path / "run" / "config.toml"
    saved.write_text(saved.read_text().replace("kinds =", 'prefix = "7"\nkinds ='))
    assert main(["worker", cfg.path, "--shard", "1/3"]) == 2  # checks the cut: no module 7
    assert "Cannot cut the model at '7'" in capsys.readouterr().err
    assert ComponentDataset(cfg.path).done_blocks() == [0]


def test_fit_then_evaluate_from_the_command_line(config_file, tmp_path, capsys):
    cfg = RunConfig.load(config_file)
    assert main(["collect", str(config_file)]) == 0
    assert main(["fit", cfg.path]) == 0
    assert "fitted 12 examples x 4 components" in capsys.readouterr().out
    assert main(["evaluate", cfg.path, "--n-masks", "20", "--alphas", "0.25", "0.5"]) == 0
    table = capsys.readouterr().out
    for method in ("coar", "leave_one_out", "gradient"):
        assert method in table
    saved = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert saved["alphas"] == [0.25, 0.5]
    assert (tmp_path / "run" / "evaluation.csv").read_text().startswith("attribution,")
    info = runs.status(cfg.path)
    assert info["fitted"] and info["evaluated"]


def test_evaluate_takes_the_expected_gradient_baseline_at_the_runs_alpha(config_file, capsys):
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    assert main(["fit", cfg.path, "--prior", "none"]) == 0
    argv = ["evaluate", cfg.path, "--n-masks", "10", "--baselines", "expected_gradient"]
    assert main(argv) == 0
    assert "expected_gradient" in capsys.readouterr().out


def test_evaluate_before_fit_says_what_to_run(config_file, capsys):
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    assert main(["evaluate", cfg.path]) == 2
    assert "coar fit" in capsys.readouterr().err


def test_report_command_writes_a_page_for_the_run(config_file, capsys):
    pytest.importorskip("matplotlib")
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    assert main(["fit", cfg.path]) == 0
    assert main(["report", cfg.path, "--examples", "0", "3"]) == 0
    page = capsys.readouterr().out.strip().splitlines()[-1]
    html = Path(page).read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html


def test_edit_command_saves_an_edit_the_report_can_read(config_file, tmp_path, capsys):
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    assert main(["fit", cfg.path]) == 0
    assert main(["edit", cfg.path, "--targets", "0", "1", "--k", "2", "--name", "t"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "edits" / "t.json").read_text())
    assert len(saved["names"]) == 2 and saved["direction"] == "raise"
    assert all(name in printed for name in saved["names"])
    assert (tmp_path / "run" / "edits" / "t.pt").exists()


@pytest.mark.slow
def test_local_launcher_from_the_command_line_equals_one_process(
    config_file, tmp_path, monkeypatch
):
    # the worker processes import the factory, and this coarpy
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    cfg = RunConfig.load(config_file)
    assert main(["collect", str(config_file), "--launcher", "local", "--devices", "cpu:2"]) == 0
    whole = runs.collect_run(
        RunConfig.from_dict({**_raw(cfg), "path": str(tmp_path / "whole")}), progress=False
    )
    assert torch.equal(ComponentDataset(cfg.path).outputs(), whole.outputs())
    assert torch.equal(ComponentDataset(cfg.path).masks(), whole.masks())


def test_worker_with_claim_finishes_every_block(config_file):
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, shard=(0, 3), progress=False)
    assert main(["worker", cfg.path, "--shard", "1/3", "--claim"]) == 0
    assert ComponentDataset(cfg.path).missing_blocks() == []


# -- every error in one line, exit status 2 (issue #16) ---------------------------------------


def _bad_config(config_file: Path, old: str, new: str) -> str:
    config_file.write_text(config_file.read_text().replace(old, new))
    return str(config_file)


BAD_COMMANDS = {
    "alpha 1.5": (
        lambda c, t: ["collect", _bad_config(c, "alpha = 0.25", "alpha = 1.5")],
        r"alpha is the fraction of components ablated",
    ),
    "shard 5/2": (
        lambda c, t: ["collect", str(c), "--shard", "5/2"],
        r"argument --shard: expected k/K such as 0/4, got '5/2'",
    ),
    "missing factory": (
        lambda c, t: ["collect", _bad_config(c, "cfgfactory:build", "nomodule:build")],
        r"Cannot import module 'nomodule'",
    ),
    "not TOML": (
        lambda c, t: ["collect", _bad_config(c, "alpha = 0.25", "alpha = ")],
        r"is not valid TOML",
    ),
    "unknown field": (
        lambda c, t: ["collect", _bad_config(c, "alpha = 0.25", "alfa = 0.25")],
        r"unknown field\(s\) alfa",
    ),
    "no config file": (lambda c, t: ["collect", str(t / "nowhere.toml")], r"No run config"),
    "worker without a run": (lambda c, t: ["worker", str(t)], r"has no config.toml"),
    "status of nothing": (lambda c, t: ["status", str(t / "x")], r"No component dataset"),
    "fit of nothing": (lambda c, t: ["fit", str(t / "x")], r"No component dataset"),
    "verify of nothing": (lambda c, t: ["verify", str(t / "x")], r"No component dataset"),
    "report of nothing": (lambda c, t: ["report", str(t / "x")], r"is not a directory"),
    "not a number": (
        lambda c, t: ["evaluate", str(t), "--n-masks", "many"],
        r"argument --n-masks: expected an integer >= 3, got 'many'",
    ),
    "unknown command": (lambda c, t: ["frobnicate"], r"invalid choice: 'frobnicate'"),
    "no command": (lambda c, t: [], r"the following arguments are required: command"),
    "bad devices": (
        lambda c, t: ["collect", str(c), "--launcher", "local", "--devices", "gpu:0"],
        r"devices must list cuda:INDEX entries or cpu:N",
    ),
    "negative restarts": (
        lambda c, t: ["collect", str(c), "--launcher", "local", "--restarts", "-1"],
        r"argument --restarts: expected an integer >= 0, got -1",
    ),
    "no workers": (
        lambda c, t: ["collect", str(c), "--launcher", "slurm", "--workers", "0"],
        r"argument --workers: expected an integer >= 1, got 0",
    ),
    "demo with no masks": (
        lambda c, t: ["demo", "--out", str(t / "demo"), "--n-masks", "0"],
        r"argument --n-masks: expected an integer >= 1, got 0",
    ),
    "demo with a negative seed": (
        lambda c, t: ["demo", "--out", str(t / "demo"), "--seed", "-1"],
        r"argument --seed: expected an integer >= 0, got -1",
    ),
    "evaluate with 2 masks": (
        lambda c, t: ["evaluate", str(t), "--n-masks", "2"],
        r"argument --n-masks: expected an integer >= 3, got 2",
    ),
    "edit before fit": (
        lambda c, t: ["edit", str(t), "--targets", "0", "--k", "2"],
        r"has no fitted attributions yet",
    ),
    "edit with a negative k": (
        lambda c, t: ["edit", str(t), "--targets", "0", "--k", "-2"],
        r"argument --k: expected an integer >= 0, got -2",
    ),
    "worker with a bad shard": (
        lambda c, t: ["worker", str(t), "--shard", "2/2"],
        r"argument --shard: expected k/K such as 0/4, got '2/2'",
    ),
    "factory raises on import": (
        lambda c, t: [
            "collect",
            _bad_config(c, "cfgfactory:build", "cfgboom:build"),
        ],
        r"importing it raised ZeroDivisionError",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_every_command_reports_bad_input_in_one_line_with_status_2(
    case, config_file, tmp_path, capsys
):
    (tmp_path / "cfgboom.py").write_text("1 / 0\n")
    make, match = BAD_COMMANDS[case]
    assert main(make(config_file, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err


# -- coar verify --------------------------------------------------------------------------------


def test_verify_reports_damage_and_repair_lets_a_worker_restore_it(config_file, capsys):
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    pristine = {p.name: p.read_bytes() for p in (Path(cfg.path) / "blocks").iterdir()}
    assert main(["verify", cfg.path]) == 0
    assert "every file checked is intact" in capsys.readouterr().out
    block = Path(cfg.path) / "blocks" / "b000001.blk"
    data = bytearray(block.read_bytes())
    data[-40] ^= 1
    block.write_bytes(bytes(data))
    assert main(["verify", cfg.path]) == 1
    assert "1 damaged block(s): " in capsys.readouterr().out
    assert main(["verify", cfg.path, "--repair"]) == 0
    assert "repaired" in capsys.readouterr().out and not block.exists()
    assert main(["worker", cfg.path]) == 0
    assert {p.name: p.read_bytes() for p in (Path(cfg.path) / "blocks").iterdir()} == pristine


# -- commands that need no model import nothing a configuration names -------------------------


def test_status_fit_report_and_verify_import_nothing_from_the_configuration(
    config_file, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("matplotlib")
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    marker = tmp_path / "imported"
    (tmp_path / "trap.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('the factory was imported')\n"
    )
    saved = Path(cfg.path) / "config.toml"
    saved.write_text(saved.read_text().replace("cfgfactory:build", "trap:build"))
    for argv in (["status", cfg.path], ["fit", cfg.path, "--prior", "none"], ["verify", cfg.path],
                 ["report", cfg.path, "--examples", "0"]):  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
    assert not marker.exists() and "trap" not in sys.modules
    assert main(["worker", cfg.path]) == 2  # a command that needs the model does import it
    assert marker.exists()
    assert "the factory was imported" in capsys.readouterr().err


def test_fit_centres_on_the_gradient_of_the_runs_model_by_default(config_file, capsys):
    from coarpy import baselines, fit
    from coarpy.attributions import Attributions

    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    assert main(["fit", cfg.path]) == 0
    assert "(group, prior gradient)" in capsys.readouterr().out
    saved = Attributions.load(Path(cfg.path) / "attributions")
    setup = cfg.build()
    grad = baselines.gradient(setup.model, setup.components, setup.data, progress=False)
    by_hand = fit(ComponentDataset(cfg.path), prior=grad, progress=False)
    assert saved.meta["prior"] == "gradient" and torch.equal(saved.weights, by_hand.weights)
    assert main(["fit", cfg.path, "--prior", "none"]) == 0
    assert "(group, prior none)" in capsys.readouterr().out
    assert main(["fit", cfg.path, "--method", "ridge", "--prior", "gradient"]) == 2
    assert "The gradient prior centres method 'group'" in capsys.readouterr().err


def test_fit_centres_on_the_expected_gradient_when_asked(config_file, capsys):
    from coarpy import baselines, fit
    from coarpy.attributions import Attributions

    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    assert main(["fit", cfg.path, "--prior", "expected_gradient"]) == 0
    assert "(group, prior expected_gradient)" in capsys.readouterr().out
    saved = Attributions.load(Path(cfg.path) / "attributions")
    setup = cfg.build()
    ds = ComponentDataset(cfg.path)
    eg = baselines.expected_gradient(
        setup.model, setup.components, setup.data, n_states=16, alpha=ds.alpha,
        seed=ds.meta["seed"], progress=False,
    )  # fmt: skip
    by_hand = fit(ds, prior=eg, progress=False)
    assert saved.meta["prior"] == "expected_gradient"
    assert torch.equal(saved.weights, by_hand.weights)


def test_fit_options_reach_the_library(config_file, capsys):
    from coarpy.attributions import Attributions

    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    argv = ["fit", cfg.path, "--method", "ridge", "--solver", "dual", "--l2-grid", "0.01",
            "0.1", "--val-fraction", "0.2"]  # fmt: skip
    assert main(argv) == 0
    assert "(ridge)" in capsys.readouterr().out
    attr = Attributions.load(Path(cfg.path) / "attributions")
    assert attr.meta["solver"] == "dual" and attr.meta["l2_grid"] == [0.01, 0.1]
    assert attr.meta["n_val"] == 6  # 20% of 30 rows, by the seeded split
    assert main(["fit", cfg.path, "--method", "group", "--val-fraction", "0.2"]) == 2
    assert "val_fraction= does not apply" in capsys.readouterr().err
    assert main(["fit", cfg.path, "--prior", "maybe"]) == 2


def test_collect_until_r_gain_stops_early_and_status_shows_the_curve(config_file, capsys):
    cfg = RunConfig.load(config_file)
    config_file.write_text(config_file.read_text().replace("n_masks = 30", "n_masks = 200"))
    # a gain in mean r below 2 is certain: the rule stops at its first check, 40 masks
    argv = ["collect", str(config_file), "--until-r-gain", "2", "--until-min-masks", "40"]
    assert main(argv) == 0
    assert len(ComponentDataset(cfg.path)) == 40
    capsys.readouterr()
    assert main(["status", cfg.path]) == 0
    shown = capsys.readouterr().out
    assert "stop rule  at 40 masks: stop (gain per doubling" in shown
    assert "curve      held-out r (group," in shown
    assert runs.status(cfg.path)["learning_curve"]["stop"] is True
    assert main(argv + ["--launcher", "local"]) == 2
    assert "--until-r-gain stops one process" in capsys.readouterr().err


# -- the command line meets users where they work -------------------------------------------


def test_version_prints_the_package_version(capsys):
    import coarpy

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"coar (coarpy) {coarpy.__version__}"


def test_every_flag_of_every_command_has_help():
    from coarpy.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"coar {name} {action.dest} has no help"


def test_a_factory_module_in_the_working_directory_is_importable(tmp_path, monkeypatch):
    """As with ``python -m``: ``factory = "here:build"`` finds ``./here.py``."""
    (tmp_path / "herefactory.py").write_text(FACTORY)
    (tmp_path / "run.toml").write_text(
        'factory = "herefactory:build"\npath = "run"\nn_masks = 10\nalpha = 0.25\n'
        'block_size = 10\nkinds = ["conv"]\n'
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "herefactory", raising=False)
    before = list(sys.path)
    assert main(["collect", "run.toml"]) == 0
    assert len(ComponentDataset(tmp_path / "run")) == 10
    assert sys.path == before  # the directory is on the path while the command runs only


def test_collect_overwrite_replaces_a_store_built_with_other_settings(config_file, capsys):
    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    config_file.write_text(config_file.read_text().replace("alpha = 0.25", "alpha = 0.5"))
    assert main(["collect", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "run `coar collect CONFIG --overwrite` to discard it" in err, err
    assert "overwrite=True" not in err
    assert main(["collect", str(config_file), "--overwrite"]) == 0
    ds = ComponentDataset(cfg.path)
    assert ds.alpha == 0.5 and len(ds) == 30
    assert runs.load_config(cfg.path).alpha == 0.5


def test_the_library_says_overwrite_true_where_the_command_line_says_the_flag(config_file):
    from coarpy.cli import LIBRARY_OVERWRITE
    from coarpy.errors import StoreMismatchError

    cfg = RunConfig.load(config_file)
    runs.collect_run(cfg, progress=False)
    import dataclasses

    with pytest.raises(StoreMismatchError, match=LIBRARY_OVERWRITE):
        runs.collect_run(dataclasses.replace(cfg, alpha=0.5), progress=False)


def test_collect_overwrite_is_refused_with_a_launcher(config_file, capsys):
    assert main(["collect", str(config_file), "--launcher", "local", "--overwrite"]) == 2
    assert "--overwrite with --launcher" in capsys.readouterr().err
