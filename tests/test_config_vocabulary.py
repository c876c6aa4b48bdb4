"""One configuration vocabulary: the run config's dotted keys. ``attack`` and ``audit`` take
``--set key=value`` like ``study``; their convenience flags come from one table (suite/cli/flags.py)
and ``--set`` is applied after them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
import typing

import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from suite.cli import flags as flag_table
from suite.cli.commands import attack as attack_cmd
from suite.cli.commands import audit as audit_cmd
from suite.cli.main import build_parser, main
from suite.config import RunConfig
from suite.errors import GistressError
from suite.keys import check_key, flatten, nest, parse_assignments


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# the shared key=value parser (suite/keys.py)
# ---------------------------------------------------------------------------------------------


def test_parse_assignments_reads_yaml_checks_keys_and_later_wins():
    got = parse_assignments(["attack.tv=0.1", "threat.defense=none", "variant_options={stem: cifar}",
                             "weights=file:/a=b.pt", "attack.tv=0.3", "size="])
    assert got == {"threat.defense": "none", "variant_options": {"stem": "cifar"}, "weights": "file:/a=b.pt",
                   "attack.tv": 0.3, "size": ""}
    assert list(got)[-2] == "attack.tv"  # a repeated key moves to where it was last given
    assert parse_assignments(["seeds=[0, 1]"], extra=("seeds",)) == {"seeds": [0, 1]}
    with pytest.raises(GistressError, match=r"unknown key 'attack.tvv' in --set \(did you mean 'attack.tv'\?\)"):
        parse_assignments(["attack.tvv=0.1"])
    with pytest.raises(GistressError, match="not key=value"):
        parse_assignments(["attack.tv"])
    # a dict given after a dotted key of the same subtree is merged over it, in order
    assert nest(parse_assignments(["attack.tv=0.5", "attack={tv: 0.2, restarts: 3}"])) == \
        {"attack": {"tv": 0.2, "restarts": 3}}
    assert flatten({"attack": {"tv": 0.2}, "variant_options": {"width": 8}, "seed": 1}) == \
        {"attack.tv": 0.2, "variant_options": {"width": 8}, "seed": 1}


# ---------------------------------------------------------------------------------------------
# the flag table
# ---------------------------------------------------------------------------------------------


def _subparser(name: str):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_table_flag_is_a_run_config_key_and_a_real_option():
    attack = _subparser("attack")
    options = {o: a for a in attack._actions for o in a.option_strings}
    for f in flag_table.FLAGS:
        check_key(f.key, "suite.cli.flags.FLAGS")
        assert f.flag in options, f.flag
        assert f"[{f.key}" in options[f.flag].help, f.flag  # --help names the key
    assert set(audit_cmd.AUDIT_FLAGS) <= {o for a in _subparser("audit")._actions for o in a.option_strings}
    # --help adds the defaults, read from the config
    text = " ".join(attack.format_help().split())
    assert "[attack.iterations; default: 300]" in text and "[attack.tv; default: the preset's]" in text
    assert "[threat.bn_mode; default: train]" in text and "[threat.shares_labels=false]" in text


def test_table_types_and_choices_match_the_config():
    """The table writes types and choices out (the parser imports no pydantic); they must be the config's."""
    values = [f for f in flag_table.FLAGS if f.kind == "value"]  # on/off/list/options flags take no type
    typed = [f for f in values if flag_table.field_of(f.key) is not None]
    # only keys inside the free-form variant_options dict have no field to check against
    assert {f.key.split(".")[0] for f in values if f not in typed} == {"variant_options"}
    assert {"--iterations", "--lr", "--bn-mode", "--preset", "--seed"} <= {f.flag for f in typed}
    for f in typed:
        info = flag_table.field_of(f.key)
        args = [info.annotation]
        if typing.get_origin(info.annotation) in (typing.Union, types.UnionType):  # X | None
            args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
        if typing.get_origin(args[0]) is typing.Literal:
            assert f.choices == typing.get_args(args[0]), f.flag
        elif args[0] in (int, float):
            assert f.type is args[0], f.flag
        else:
            assert f.type is None and f.choices is None, f.flag


def test_building_the_parser_imports_no_pydantic():
    code = ("import sys; from suite.cli.main import build_parser; build_parser(); "
            "print('pydantic' in sys.modules, 'suite.config' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # gistress --help stays fast


def test_flags_map_to_their_keys():
    args = _args("attack", "--variant", "resnet18", "--stem", "cifar", "--opt", "width=8", "--no-labels",
                 "--unknown-training", "--control", "--image", "astronaut,coffee", "--image-id", "rocket",
                 "--tv", "0.3", "--bn-mode", "eval", "--seed", "3")
    assert flag_table.flag_overrides(args, flag_table.FLAGS) == {
        "variant": "resnet18", "variant_options.stem": "cifar", "variant_options.width": 8,
        "images": ["astronaut", "coffee", "rocket"], "threat.bn_mode": "eval",
        "threat.attacker_knows_training": False, "threat.shares_labels": False, "attack.tv": 0.3,
        "attack.control": True, "seed": 3,
    }
    # flags left out set nothing: the config's defaults fill the rest
    assert flag_table.flag_overrides(_args("attack", "--variant", "lenet"), flag_table.FLAGS) == {"variant": "lenet"}


def test_set_is_applied_after_the_flags():
    cfg = attack_cmd.config_from_args(_args(
        "attack", "--variant", "lenet", "--set", "attack.tv=0.1", "--tv", "0.3", "--iterations", "5",
        "--set", "variant_options.num_classes=5", "--num-classes", "7", "--image", "astronaut",
        "--set", "images=[coffee, rocket]", "--set", "threat.defense=qsgd:8"))
    assert cfg.attack.tv == 0.1 and cfg.attack.iterations == 5  # --set wins over --tv, whatever the order
    assert cfg.variant_options == {"num_classes": 5} and cfg.images == ["coffee", "rocket"]
    assert cfg.threat.defense == "qsgd:8"
    # between --set items, the later one wins
    later = attack_cmd.config_from_args(_args("attack", "--variant", "lenet", "--set", "attack.tv=0.2",
                                              "--set", "attack={tv: 0.5, restarts: 3}"))
    assert (later.attack.tv, later.attack.restarts) == (0.5, 3)
    # --set reaches keys no flag has
    reached = attack_cmd.config_from_args(_args("attack", "--variant", "lenet", "--set", "attack.signed=false",
                                                "--set", "leak.gain_db=3"))
    assert reached.attack.signed is False and reached.leak.gain_db == 3


def test_attack_set_ends_up_in_the_run_config_and_mlflow_params(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["attack", "--variant", "lenet", "--data", "samples", "--size", "32", "--iterations", "2",
               "--set", "attack.tv=0.1", "--set", "attack.restarts=2", "--quiet", "--json",
               "--out", str(tmp_path / "out"), "--tracking-uri", uri, "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attack"]["tv"] == 0.1 and config["attack"]["restarts"] == 2
    run_id = json.loads(out.strip().splitlines()[-1])["run_id"]
    params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert params["weight/tv"] == "0.1" and params["restarts"] == "2" and params["iterations"] == "2"


@pytest.mark.parametrize("command", ["attack", "audit"])
def test_misspelt_set_key_is_one_line_exit_2_and_writes_nothing(workdir, capsys, command):
    rc = main([command, "--variant", "lenet", "--iterations", "2", "--set", "attack.restrats=2",
               "--out", "out"])
    line = _one_line_error(capsys)
    assert rc == 2
    assert "unknown key 'attack.restrats' in --set (did you mean 'attack.restarts'?)" in line
    assert not any(workdir.iterdir())  # no output folder, no MLflow store


def test_the_retired_psnr_leak_keys_are_refused_with_their_replacement(workdir, capsys):
    rc = main(["attack", "--variant", "lenet", "--iterations", "2", "--set", "leak_psnr=20", "--out", "out"])
    line = _one_line_error(capsys)
    assert rc == 2
    assert "leak_psnr belongs to the retired PSNR leak rule; set leak.gain_db" in line
    assert not any(workdir.iterdir())
    with pytest.raises(ValidationError, match="leak_lpips belongs to the retired PSNR leak rule; set leak.lpips"):
        RunConfig(variant="lenet", leak_lpips=0.2)  # a study spec's base or grid


# ---------------------------------------------------------------------------------------------
# gistress audit --set
# ---------------------------------------------------------------------------------------------


def test_audit_set_restarts_plans_every_level_and_control_with_it():
    # 3 restarts: no level of the quick budget has them (strongest has 2), so an ignored override shows
    args = _args("audit", "--variant", "convnet", "--opt", "width=4", "--opt", "batchnorm=true",
                 "--image", "astronaut", "--iterations", "2", "--set", "attack.restarts=3",
                 "--set", "threat.defense=qsgd:8")
    plan = audit_cmd.plan_from_args(args)
    assert len(plan.levels) == 7  # convnet with BN: every level of the battery
    for pl in plan.levels:
        assert (pl.config.attack.restarts, pl.config.attack.iterations) == (3, 2), pl.name
        assert pl.config.threat.defense == "qsgd:8"
        assert pl.control is not None and pl.control.attack.restarts == 3
        assert pl.control.variant == ("lenet" if pl.level.key == "dlg" else "mlp")  # the 32 px references
        # the budget search's attempts and the level at the budget they set keep the override
        assert pl.control_level(400).config.attack.restarts == 3 and pl.at(400).config.threat.defense == "qsgd:8"
        assert pl.config.attack.preset == pl.level.preset and pl.config.attack.control  # the level's own
    strongest = next(pl for pl in plan.levels if pl.level.key == "strongest")
    assert (strongest.config.threat.bn_mode, strongest.config.threat.bn_stats) == ("eval", "exact")
    assert plan.iterations_override == 2
    assert any("--set: attack.restarts=3 threat.defense=qsgd:8" in n for n in plan.notes)


def test_audit_set_wins_over_its_flags_and_sets_the_base():
    plan = audit_cmd.plan_from_args(_args(
        "audit", "--variant", "lenet", "--image", "astronaut", "--iterations", "2", "--seed", "1",
        "--set", "attack.iterations=3", "--set", "seed=5", "--set", "attack.tv=0.05"))
    assert plan.iterations_override == 3 and plan.base.seed == 5
    assert {pl.config.attack.iterations for pl in plan.levels} == {3}
    assert {pl.config.attack.tv for pl in plan.levels} == {0.05}
    assert {pl.config.seed for pl in plan.levels} == {5}


@pytest.mark.parametrize("key", ["threat.bn_mode=eval", "attack.preset=dlg", "threat={update: fedavg}"])
def test_audit_refuses_keys_its_levels_set(workdir, capsys, key):
    rc = main(["audit", "--variant", "lenet", "--iterations", "2", "--set", key, "--out", "out"])
    line = _one_line_error(capsys)
    assert rc == 2 and "set by the audit's threat levels themselves" in line
    assert not any(workdir.iterdir())


def test_audit_records_its_overrides_in_report_and_mlflow(workdir, capsys):
    """A tiny real audit (lenet, 1 iteration, no positive controls: about 15 s); 3 restarts, which
    no level of the quick budget has of its own."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    rc = main(["audit", "--variant", "lenet", "--image", "astronaut", "--iterations", "1", "--no-positive-control",
               "--set", "attack.restarts=3", "--quiet", "--json", "--out", "out", "--tracking-uri", uri])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["audit.set"] == "attack.restarts=3"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert children and {c.data.params["restarts"] for c in children} == {"3"}
    notes = json.loads((workdir / "out" / "verdict.json").read_text())["notes"]
    assert any("overrides given with --set: attack.restarts=3" in n for n in notes)
    assert "overrides given with --set: attack.restarts=3" in (workdir / "out" / "report.md").read_text()
