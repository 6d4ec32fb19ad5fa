"""Sweep spec: the design's example parses, each invalid choice is a one-line error, and
train_config() merges the base with a sampled point into a valid train config."""

from __future__ import annotations

import copy

import pytest
import yaml

from msam.config import TrainConfig
from msam.errors import UserError
from msam.files import atomic_write
from sweeps.layout import RunFolder
from sweeps.spec import MAX_NAME_LENGTH, load_sweep_spec, parse_sweep_spec

DESIGN_EXAMPLE = """\
name: fmnist-resnet18
base: {data: {dataset: fashion_mnist}, model: {name: resnet18}, optim: {base: sgd, momentum: 0.9},
       train: {epochs: 10, batch_size: 128}, tracking: {wandb: {mode: offline}}}
optimizers: [sgd, sam, msam]
search:
  lr:            {low: 0.01, high: 1.0, log: true}
  rho:           {low: 0.01, high: 0.5, log: true}   # sam, msam only
  micro_batches: {choices: [2, 4, 8, 16]}            # msam only; each must divide batch_size
budget: {trials: 30, sampler: tpe, pruner: median, seed: 0}   # trials per optimizer
final:  {top_k: 1, seeds: 3, epochs: null}                    # seeds: 0 skips the final stage
"""

SPEC = yaml.safe_load(DESIGN_EXAMPLE)


def changed(path: str, value=None, *, delete: bool = False) -> dict:
    raw = copy.deepcopy(SPEC)
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if delete:
        del node[last]
    else:
        node[last] = value
    return raw


def error_of(raw) -> str:
    with pytest.raises(UserError) as info:
        parse_sweep_spec(raw, source="spec.yaml")
    message = str(info.value)
    assert message.startswith("spec.yaml: ") and "\n" not in message
    return message


def test_design_example_parses(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(DESIGN_EXAMPLE)
    spec = load_sweep_spec(path)
    assert spec.optimizers == ["sgd", "sam", "msam"]
    assert spec.search.micro_batches.choices == [2, 4, 8, 16]
    assert spec.search.lr.log and spec.budget.match == "epochs"
    assert spec.final.seeds == 3 and spec.final.epochs is None
    assert spec.search.searched("sgd") == ["lr"]
    assert spec.search.searched("msam") == ["lr", "rho", "micro_batches"]


def test_to_dict_round_trips():
    spec = parse_sweep_spec(SPEC)
    resolved = spec.to_dict()
    assert yaml.safe_load(yaml.safe_dump(resolved)) == resolved
    assert parse_sweep_spec(resolved) == spec


def test_overrides(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(DESIGN_EXAMPLE)
    spec = load_sweep_spec(path, ["base.train.epochs=2", "budget.trials=4", "optimizers=[sgd]"])
    assert spec.base.train.epochs == 2 and spec.budget.trials == 4 and spec.optimizers == ["sgd"]


def test_train_config_merges_base_and_sampled_point():
    spec = parse_sweep_spec(SPEC)
    cfg = spec.train_config("msam", {"lr": 0.3, "rho": 0.2, "micro_batches": 4})
    assert isinstance(cfg, TrainConfig)
    assert cfg.name == "fmnist-resnet18-msam"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.rho, cfg.optim.micro_batches) == (
        "msam",
        0.3,
        0.2,
        4,
    )
    assert cfg.optim.momentum == 0.9 and cfg.train.batch_size == 128
    assert cfg.data.dataset == "fashion_mnist" and cfg.tracking.wandb.mode == "offline"


def test_train_config_records_no_unused_values():
    spec = parse_sweep_spec(changed("base.optim.micro_batches", 8))
    sgd = spec.train_config("sgd", {"lr": 0.05})
    assert (sgd.optim.name, sgd.optim.rho, sgd.optim.micro_batches) == ("sgd", 0.0, 1)
    sam = spec.train_config("sam", {"lr": 0.05, "rho": 0.1})
    assert (sam.optim.rho, sam.optim.micro_batches) == (0.1, 1)


def test_train_config_takes_dotted_overrides_for_finals():
    spec = parse_sweep_spec(SPEC)
    cfg = spec.train_config("sam", {"lr": 0.1, "train.seed": 3, "train.epochs": 20})
    assert cfg.train.seed == 3 and cfg.train.epochs == 20
    assert spec.base.train.seed == 0  # the spec itself is unchanged


def test_train_config_validates_the_point():
    spec = parse_sweep_spec(SPEC)
    with pytest.raises(UserError, match="not divisible by optim.micro_batches 3"):
        spec.train_config("msam", {"micro_batches": 3})
    with pytest.raises(ValueError, match="unknown parameter 'momentum'"):
        spec.train_config("sgd", {"momentum": 0.5})


def test_base_optim_name_is_ignored():
    spec = parse_sweep_spec(changed("base.optim.name", "sam"))
    assert spec.train_config("msam", {"micro_batches": 4}).optim.name == "msam"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (changed("optimizers", []), "optimizers: must list at least one"),
        (changed("optimizers", ["sgd", "sgd"]), "optimizers: 'sgd' is listed twice"),
        (changed("optimizers", ["sgd", "adam"]), "optimizers[1]: unknown value 'adam'"),
        (changed("search.lr.low", 2.0), "search.lr: low 2.0 must be below high 1.0"),
        (changed("search.lr.low", 0.0), "search.lr: low must be > 0 with log: true"),
        (changed("search.rho", {"low": -0.1, "high": 0.5}), "search.rho values must be >= 0"),
        (changed("search.lr", {"high": 1.0}), "search.lr: needs low and high"),
        (changed("search.lr", {"low": 0.1, "high": 1, "choices": [1]}), "not both"),
        (changed("search.lr", {"choices": []}), "search.lr: choices: must not be empty"),
        (changed("search.lr.hgih", 1.0), "unknown key 'search.lr.hgih' (did you mean 'high'?)"),
        (changed("search.rhoo", {}), "unknown key 'search.rhoo' (did you mean 'rho'?)"),
        (
            changed("search.micro_batches.choices", [2, 3, 4]),
            "search.micro_batches: choice 3 does not divide base.train.batch_size 128",
        ),
        (changed("search.micro_batches.choices", [0]), "each choice must be >= 1 (got 0)"),
        (changed("search.micro_batches.choices", [2, 2]), "choices: 2 is listed twice"),
        (
            changed("search.micro_batches", {"low": 1, "high": 4}),
            "search.micro_batches.choices: required key is missing",
        ),
        (changed("budget.sampler", "grid"), "budget.sampler=grid needs search.lr as {choices"),
        (changed("budget.sampler", "tpee"), "(did you mean 'tpe'?)"),
        (changed("budget.pruner", "medain"), "(did you mean 'median'?)"),
        (changed("budget.match", "evals"), "(did you mean 'grad_evals'?)"),
        (changed("budget.trials", 0), "budget.trials: Input should be greater than or equal to 1"),
        (changed("final.top_k", 0), "final.top_k: Input should be greater than or equal to 1"),
        (changed("final.seeds", -1), "final.seeds: Input should be greater than or equal to 0"),
        (changed("final.epochs", 0), "final.epochs: Input should be greater than or equal to 1"),
        (changed("base.name", "x"), "base.name is not used"),
        (changed("base.optim.rhoo", 0.1), "unknown key 'base.optim.rhoo' (did you mean 'rho'?)"),
        (changed("base.data.dataset", "cifar"), "base.data.dataset: unknown value 'cifar'"),
        (changed("base", delete=True), "base: required key is missing"),
        (changed("name", "a/b"), "name: use letters, digits"),
    ],
)
def test_invalid_specs(raw, expected):
    assert expected in error_of(raw)


def test_msam_without_searched_micro_batches_checks_the_base_value():
    raw = changed("search.micro_batches", delete=True)
    raw["base"]["optim"]["micro_batches"] = 3
    assert "base (as msam): train.batch_size 128 is not divisible" in error_of(raw)
    raw["optimizers"] = ["sgd", "sam"]  # mSAM not swept: the base value is unused
    assert parse_sweep_spec(raw).optimizers == ["sgd", "sam"]


def test_grid_with_choices_everywhere():
    raw = changed("budget.sampler", "grid")
    raw["search"]["lr"] = {"choices": [0.05, 0.1]}
    raw["search"]["rho"] = {"choices": [0.05, 0.1]}
    spec = parse_sweep_spec(raw)
    assert spec.search.lr.values() == [0.05, 0.1]
    assert spec.budget.pruner == "median"


def test_null_pruner_means_none():
    assert parse_sweep_spec(changed("budget.pruner", None)).budget.pruner == "none"


# ----------------------------------------------------------------------------- bounds


def test_the_longest_name_leaves_room_for_every_file_named_after_it(tmp_path):
    """The longest file a sweep derives from its name, ``tuned/<name>-msam.yaml`` written
    through ``.tmp``, can be created; one character more is refused before any work."""
    assert MAX_NAME_LENGTH == 241
    name = "n" * MAX_NAME_LENGTH
    spec = parse_sweep_spec(changed("name", name))
    folder = RunFolder(tmp_path / name)
    folder.tuned_dir.mkdir(parents=True)
    for optimizer in spec.optimizers:
        atomic_write(folder.tuned(name, optimizer), "name: x\n")
        assert spec.train_config(optimizer, {}).name == f"{name}-{optimizer}"
    with pytest.raises(OSError, match="File name too long"):
        (folder.tuned_dir / (folder.tuned(name, "msam").name + ".tmp" + "x")).write_text("")
    message = error_of(changed("name", name + "n"))
    assert "name: at most 241 characters" in message and "(got 242)" in message


@pytest.mark.parametrize("key", ["budget.seed", "final.flatness.seed"])
def test_seeds_are_non_negative_and_below_2_to_the_31(key):
    assert "greater than or equal to 0 (got -5)" in error_of(changed(key, -5))
    assert "less than 2147483648" in error_of(changed(key, 2**31))
    parse_sweep_spec(changed(key, 2**31 - 1))


def test_warmup_is_checked_against_the_base_and_the_finals_epochs():
    raw = changed("base.train.warmup_epochs", 11)
    assert "base.train.warmup_epochs: 11 is more than the run's epochs (10)" in error_of(raw)
    raw = changed("base.train.warmup_epochs", 4)
    raw["final"]["epochs"] = 3
    message = error_of(raw)
    assert "final.epochs 3 is less than base.train.warmup_epochs 4" in message
    raw["final"]["epochs"] = 4
    spec = parse_sweep_spec(raw)
    assert spec.train_config("sam", {"train.epochs": spec.final.epochs}).train.warmup_epochs == 4


def test_grad_evals_matching_keeps_every_run_within_the_epoch_bound():
    raw = changed("budget.match", "grad_evals")
    raw["base"]["train"]["epochs"] = 6000  # sgd would train 12000
    assert "trains sgd 12000 epochs for base.train.epochs 6000" in error_of(raw)
    raw["optimizers"] = ["sam", "msam"]  # no cheaper optimizer: 6000 each
    parse_sweep_spec(raw)
    raw = changed("budget.match", "grad_evals")
    raw["final"]["epochs"] = 5001
    assert "trains sgd 10002 epochs for final.epochs 5001" in error_of(raw)
    raw["final"]["epochs"] = 5000
    parse_sweep_spec(raw)
    parse_sweep_spec(changed("base.train.epochs", 10_000))  # budget.match: epochs


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("budget.trials", 10_000, 10_001),
        ("final.top_k", 100, 101),
        ("final.seeds", 1000, 1001),
        ("final.epochs", 10_000, 10_001),
        ("final.flatness.images", 1_000_000, 1_000_001),
        ("final.flatness.batch_size", 65_536, 65_537),
        ("final.flatness.iters", 10_000, 10_001),
        ("final.flatness.samples", 10_000, 10_001),
        ("base.train.epochs", 10_000, 10_001),
        ("base.train.batch_size", 65_536, 65_537),
    ],
)
def test_sizes_are_bounded(key, good, bad):
    parse_sweep_spec(changed(key, good))
    assert f"{key}: Input should be less than or equal to {good} (got {bad})" in error_of(
        changed(key, bad)
    )


def test_wandb_settings_of_the_base_are_checked():
    message = error_of(changed("base.tracking.wandb", {"project": "a/b"}))
    assert "base.tracking.wandb.project: W&B refuses" in message
