"""The command lines are their config classes: a flag per field, a field per flag, declared once.

``grassopt train`` / ``finetune`` / ``bench`` build their flags from the fields of ``TrainConfig`` and
``FinetuneConfig`` (:func:`grassopt.engine.config.setting`): help, choices, default, parsing, and whether a
field is run control. These tests hold every field to a flag and every flag to a field, with the bench's
own flags and fields listed (each with its reason) in ``grassopt.bench.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from grassopt import registry
from grassopt.bench import cli as bench_cli
from grassopt.engine import cli as engine_cli
from grassopt.engine.config import RunConfig, setting, state_dtype_choices
from grassopt.finetune import cli as ft_cli
from grassopt.finetune.loop import FinetuneConfig
from grassopt.train import cli as train_cli
from grassopt.train.loop import TrainConfig


def _flags(ap: argparse.ArgumentParser) -> dict[str, list[str]]:
    """dest -> option strings of every flag but --help."""
    return {a.dest: list(a.option_strings) for a in ap._actions if a.dest != "help"}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls, make_parser", [(TrainConfig, train_cli.parser), (FinetuneConfig, ft_cli.parser)],
                         ids=["train", "finetune"])
def test_every_config_field_has_its_flag_and_every_flag_its_field(cls, make_parser):
    ap = make_parser()
    flags = _flags(ap)
    assert set(flags) == _fields(cls)  # no exceptions: train and finetune are their config classes
    assert set(ap.get_default("_config_fields")) == _fields(cls)
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{f.name} has no help"


def test_the_bench_run_flags_are_the_train_fields_but_its_own_listed_with_reasons():
    ap = bench_cli.parser()
    flags = _flags(ap)
    from_fields = set(ap.get_default("_config_fields"))  # the flags add_config_arguments made of fields
    assert from_fields <= _fields(TrainConfig)
    assert set(flags) - from_fields == set(bench_cli.BENCH_FLAGS)  # its own flags, each with a reason
    assert _fields(TrainConfig) - from_fields == set(bench_cli.BENCH_FIELDS)  # fields it sets itself, with reasons
    assert all(bench_cli.BENCH_FLAGS.values()) and all(bench_cli.BENCH_FIELDS.values())
    # every flag the bench shares with train is the same flag (name, default, choices)
    train = {a.dest: a for a in train_cli.parser()._actions}
    for a in ap._actions:
        if a.dest in from_fields:
            t = train[a.dest]
            assert (a.option_strings, a.default, a.choices) == (t.option_strings, t.default, t.choices), a.dest


def test_flag_defaults_are_the_field_defaults():
    for cls, ap in ((TrainConfig, train_cli.parser()), (FinetuneConfig, ft_cli.parser())):
        assert engine_cli.config_from_args(cls, ap.parse_args([])) == cls()
    assert train_cli.config_from_args(bench_cli.parser().parse_args([])) == TrainConfig()


def test_run_control_is_a_flag_on_each_field():
    base = {"out", "resume", "overwrite", "stop_after", "checkpoint_every", "log_every", "progress", "threads", "plot"}
    assert RunConfig.RUN_CONTROL == base
    assert TrainConfig.RUN_CONTROL == base | {"profile_memory", "checkpoint_activations", "subspace_quality",
                                              "cache_dir", "eval_batch_size", "compile"}
    assert FinetuneConfig.RUN_CONTROL == base | {"eval_batch_size", "measure_activations"}
    for cls in (TrainConfig, FinetuneConfig):
        assert cls.RUN_CONTROL == {f.name for f in dataclasses.fields(cls) if f.metadata["run_control"]}


def test_betas_is_a_flag_in_either_form_and_a_bad_pair_is_one_line(capsys):
    ap = train_cli.parser()
    assert train_cli.config_from_args(ap.parse_args(["--betas", "0.9,0.95"])).betas == (0.9, 0.95)
    assert train_cli.config_from_args(ap.parse_args(["--betas", "0.8", "0.9"])).betas == (0.8, 0.9)
    assert ft_cli.config_from_args(ft_cli.parser().parse_args(["--betas", "0.9, 0.95"])).betas == (0.9, 0.95)
    for bad in (["0.9"], ["0.9,0.95,0.99"], ["0.9,x"]):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(["--betas", *bad])
        assert e.value.code == 2
        assert "argument --betas: expected two numbers" in capsys.readouterr().err


def test_the_sketch_rank_is_read_the_same_way_by_train_and_finetune(capsys):
    for make, cfg_of in ((train_cli.parser, train_cli.config_from_args), (ft_cli.parser, ft_cli.config_from_args)):
        ap = make()
        eight = cfg_of(ap.parse_args(["--sketch-rank", "8"])).sketch_rank
        assert eight == 8 and isinstance(eight, int)
        assert cfg_of(ap.parse_args(["--sketch-rank", "8.0"])).sketch_rank == 8
        assert cfg_of(ap.parse_args(["--sketch-rank", "0.25"])).sketch_rank == 0.25
        for bad in ("1.5", "0", "-2", "x", "inf"):
            with pytest.raises(SystemExit):
                ap.parse_args(["--sketch-rank", bad])
            assert "expected a fraction in (0, 1) or an integer >= 1" in capsys.readouterr().err


def test_state_dtype_choices_come_from_one_place():
    action = next(a for a in train_cli.parser()._actions if a.dest == "state_dtype")
    assert action.choices == state_dtype_choices() and "float32" in action.choices


def test_a_variant_may_set_any_config_field_warmup_included():
    name, fields, options = bench_cli.parse_variant("subtrack++:warmup=10")
    assert (name, fields, options) == ("subtrack++", {"warmup": 10}, {})
    cfg = dataclasses.replace(TrainConfig(model="nano", vocab_size=1024, seq_len=32, rank=8, out="unused"),
                              preset=name, options=options, **fields)
    bench_cli.preflight("subtrack++:warmup=10", cfg)  # accepted (was: "unknown option(s) ['warmup']")
    assert cfg.warmup_steps() == 10
    # the bench's own fields, the options and the run control stay out (checkpoint_activations: a memory setting)
    keys = bench_cli.variant_keys()
    assert "checkpoint_activations" in keys and not keys & {"preset", "seed", "options", "out", "resume", "threads"}
    assert bench_cli.parse_variant("subtrack++:seed=1")[2] == {"seed": 1}


def test_a_new_field_is_a_flag_a_config_value_and_a_variant_key_with_no_other_change():
    @dataclasses.dataclass
    class Extended(TrainConfig):
        label_smoothing: float = setting(0.0, "label smoothing of the loss", group="optimizer")

    ap = argparse.ArgumentParser()
    engine_cli.add_config_arguments(ap, Extended, train_cli.GROUPS)
    assert "--label-smoothing" in _flags(ap)["label_smoothing"]
    assert engine_cli.config_from_args(Extended, ap.parse_args(["--label-smoothing", "0.1"])).label_smoothing == 0.1
    assert "label_smoothing" in bench_cli.variant_keys(Extended)
    assert "label_smoothing" not in Extended.RUN_CONTROL


def test_a_field_declared_without_its_flag_is_refused_when_the_parser_is_built():
    @dataclasses.dataclass
    class Careless(TrainConfig):
        undocumented: int = 3

    with pytest.raises(TypeError, match="undocumented.*has no help"):
        engine_cli.add_config_arguments(argparse.ArgumentParser(), Careless, train_cli.GROUPS)


def test_one_error_handler_one_line_exit_code_2(capsys):
    def fails(e: BaseException):
        def body():
            raise e
        return body

    assert engine_cli.run_command("grassopt x", lambda: 0) == 0
    assert engine_cli.run_command("grassopt x", lambda: 130) == 130
    assert engine_cli.run_command("grassopt x", fails(ValueError("lr=-1 must be > 0 (--lr)"))) == 2
    assert capsys.readouterr().err == "grassopt x: error: lr=-1 must be > 0 (--lr)\n"
    assert engine_cli.run_command("grassopt x", fails(OSError(28, "No space left on device", "/x/m.jsonl"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("grassopt x: error: No space left on device (/x/m.jsonl)") and err.count("\n") == 1
    with pytest.raises(KeyError):  # a bug is a traceback, not a user error
        engine_cli.run_command("grassopt x", fails(KeyError("bug")))


def test_every_cli_uses_the_one_handler(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train_cli.main(["--model", "nano", "--lr", "-1", "--out", out]) == 2
    assert capsys.readouterr().err.startswith("grassopt train: error: lr=-1")
    assert ft_cli.main(["--lr", "-1", "--out", out]) == 2
    assert capsys.readouterr().err.startswith("grassopt finetune: error: lr=-1")
    assert bench_cli.main(["--presets", "adamw-torch", "--no-refs", "--lr", "-1", "--out", out]) == 2
    assert "grassopt bench: error: variant 'adamw-torch' (lr=-1.0): lr=-1.0" in capsys.readouterr().err


@pytest.mark.parametrize("name, takes", [("ref-galore", "['alpha']"), ("ref-apollo", "['scale', 'scale_type']")])
def test_the_reference_packages_of_our_presets_refuse_options_they_do_not_take(name, takes):
    from torch import nn

    from grassopt.references import available
    entry = registry.ENTRIES[name]
    assert entry.options is not None and entry.build is not None
    model = nn.Sequential(nn.Linear(30, 20))
    with pytest.raises(ValueError) as e:
        registry.build(name, model, rank=4, options={"transport": "keep"})
    assert str(e.value).startswith(f"unknown option(s) ['transport'] for preset {name!r}; it takes {takes}")
    if available(name):
        registry.build(name, model, rank=4, options={k: v for k, v in (("alpha", 0.25),) if k in entry.options})


def test_every_preset_is_one_entry_with_its_builder():
    assert all(entry.build is not None for entry in registry.ENTRIES.values())
    assert set(registry.ENTRIES) == set(registry.PRESETS) | set(registry.OTHER_ENTRIES)


def test_compile_is_one_field_a_flag_of_train_and_bench_run_control_and_only_for_our_presets():
    for ap in (train_cli.parser(), bench_cli.parser()):
        assert train_cli.config_from_args(ap.parse_args(["--compile"])).compile is True
    assert "compile" in TrainConfig.RUN_CONTROL  # within 1e-6 per step of the eager step: a resume may switch it
    assert bench_cli.parse_variant("subtrack++:state_dtype=int8,compile=True")[1] == {"state_dtype": "int8",
                                                                                      "compile": True}
    with pytest.raises(ValueError, match=r"^compile=True must be True or False, and True applies to grassopt's "
                                         r"presets \(SubspaceAdamW\), not to 'adamw-torch' \(--compile\)$"):
        TrainConfig(preset="adamw-torch", compile=True).validate()
