"""Train config: defaults, the design's example, one-line errors naming the key for bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from msam.config import (
    DATASETS,
    SyntheticConfig,
    TrainConfig,
    apply_overrides,
    check_optimizer_name,
    load_train_config,
    load_yaml,
    parse_train_config,
)
from msam.errors import UserError

DESIGN_EXAMPLE = """\
name: fmnist-resnet18-msam
data:  {dataset: fashion_mnist, root: null, val_fraction: 0.1, subset: null, augment: auto}
model: {name: resnet18, small_input: auto, kwargs: {}}        # any timm model name
optim: {name: msam, base: sgd, lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4,
        rho: 0.05, micro_batches: 8, adaptive: false}         # name: sgd | sam | msam
train: {epochs: 10, batch_size: 128, schedule: cosine, warmup_epochs: 0, label_smoothing: 0.0,
        grad_clip: null, amp: auto, seed: 0, device: auto, compile: false}
tracking: {wandb: {project: msam, mode: auto}}                # auto | online | offline | disabled
"""

MINIMAL = {"data": {"dataset": "digits"}}


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def with_value(path: str, value) -> dict:
    """MINIMAL with ``value`` set at a dotted ``path``."""
    raw = copy.deepcopy(MINIMAL)
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return raw


def error_of(raw) -> str:
    with pytest.raises(UserError) as info:
        parse_train_config(raw, source="cfg.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cfg.yaml: ")
    return message


def test_defaults_parse():
    cfg = parse_train_config(MINIMAL)
    assert cfg.name == "run"
    assert cfg.model.name == "resnet18" and cfg.model.small_input == "auto"
    assert (cfg.optim.name, cfg.optim.base, cfg.optim.rho, cfg.optim.micro_batches) == (
        "sgd",
        "sgd",
        0.05,
        1,
    )
    assert cfg.train.schedule == "cosine" and cfg.train.checkpoint is True
    assert cfg.tracking.wandb.project == "msam" and cfg.tracking.wandb.tags == []
    assert cfg.data.synthetic is None


def test_design_example_loads_and_round_trips(tmp_path):
    cfg = load_train_config(write(tmp_path, DESIGN_EXAMPLE))
    assert cfg.name == "fmnist-resnet18-msam"
    assert cfg.optim.name == "msam" and cfg.optim.micro_batches == 8
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    resolved = cfg.to_dict()
    assert isinstance(resolved, dict) and resolved["train"]["batch_size"] == 128
    assert yaml.safe_load(yaml.safe_dump(resolved)) == resolved  # plain types only
    assert parse_train_config(resolved) == cfg


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, TrainConfig.__base__):
                walk(annotation)
            else:
                assert field.description, f"{model.__name__}.{name} has no description"

    walk(TrainConfig)


def test_synthetic_defaults_follow_the_data_layer():
    cfg = parse_train_config({"data": {"dataset": "synthetic"}})
    assert cfg.data.synthetic == SyntheticConfig()
    data = pytest.importorskip("msam.data")
    assert SyntheticConfig().model_dump() == dict(data.SYNTHETIC_DEFAULTS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (with_value("optim.rhoo", 0.1), "unknown key 'optim.rhoo' (did you mean 'rho'?)"),
        ({**MINIMAL, "optm": {}}, "unknown key 'optm' (did you mean 'optim'?)"),
        (
            with_value("data.synthetic", {"num_trian": 5}),
            "unknown key 'data.synthetic.num_trian' (did you mean 'num_train'?)",
        ),
        (with_value("train.epochs", "ten"), "train.epochs: Input should be a valid integer"),
        (with_value("train.epochs", True), "train.epochs: Input should be a valid integer"),
        (with_value("train.batch_size", 12.5), "train.batch_size: Input should be a valid integer"),
        (with_value("optim.lr", True), "optim.lr: expected a number (got true)"),
        (with_value("optim.rho", -1), "optim.rho: Input should be greater than or equal to 0"),
        (with_value("optim.lr", 0), "optim.lr: Input should be greater than 0 (got 0)"),
        (with_value("optim.lr", -0.1), "optim.lr: Input should be greater than 0 (got -0.1)"),
        (with_value("optim.momentum", 1.0), "optim.momentum: Input should be less than 1"),
        (with_value("data.val_fraction", 1.0), "data.val_fraction: Input should be less than 1"),
        (with_value("data.subset", 0), "data.subset: Input should be greater than 0"),
        (with_value("data.augment", "yes"), "data.augment: expected auto, true or false"),
        (with_value("data.dataset", "fashionmnist"), "did you mean 'fashion_mnist'?"),
        (
            with_value("optim.name", "msma"),
            "optim.name: unknown value 'msma' (did you mean 'msam'?)",
        ),
        (with_value("train.amp", "fp32"), "train.amp: unknown value 'fp32'"),
        (with_value("train.schedule", "cosin"), "(did you mean 'cosine'?)"),
        (with_value("train.device", "gpu"), "train.device: expected auto, cpu, cuda or cuda:N"),
        (with_value("tracking.wandb.mode", "ofline"), "(did you mean 'offline'?)"),
        (with_value("name", "a/b"), "name: use letters, digits"),
        ({"model": {}}, "data: required key is missing"),
        (with_value("data", [1]), "data: expected a mapping of keys (got [1])"),
        (with_value("data.dataset", "imagefolder"), "data.root is required"),
        (
            with_value("data.img_size", 32),
            "data.img_size is only used with data.dataset=imagefolder",
        ),
        (with_value("data.synthetic", {}), "data.synthetic is only used with"),
    ],
)
def test_bad_values_name_the_key(raw, expected):
    assert expected in error_of(raw)


def test_micro_batches_must_divide_batch_size():
    raw = with_value("optim", {"name": "msam", "micro_batches": 3})
    message = error_of(raw)
    assert "train.batch_size 128" in message and "optim.micro_batches 3" in message
    raw["train"] = {"batch_size": 96}
    assert parse_train_config(raw).optim.micro_batches == 3


def test_sam_with_micro_batches_points_to_msam():
    message = error_of(with_value("optim", {"name": "sam", "micro_batches": 4}))
    assert "optim.micro_batches is 4" in message and "use optim.name=msam" in message


def test_sgd_ignores_sharpness_settings():
    cfg = parse_train_config(with_value("optim", {"name": "sgd", "micro_batches": 3}))
    assert cfg.optim.micro_batches == 3  # kept, unused: no divisibility demand for sgd


def test_unknown_dataset_lists_choices():
    message = error_of(with_value("data.dataset", "imagenet"))
    assert all(name in message for name in DATASETS)


def test_several_problems_stay_on_one_line():
    message = error_of({"data": {"dataset": "digits"}, "optim": {"lr": -1, "rho": -1}})
    assert message.endswith("(+1 more)")


def test_amp_false_means_none():
    assert parse_train_config(with_value("train.amp", False)).train.amp == "none"


def test_float_strings_in_scientific_notation_are_numbers():
    assert parse_train_config(with_value("optim.lr", "1e-3")).optim.lr == pytest.approx(1e-3)


def test_overrides_parse_yaml_types():
    raw = apply_overrides(
        MINIMAL,
        [
            "optim.lr=0.1",
            "optim.adaptive=true",
            "tracking.wandb.tags=[a, b]",
            "optim.weight_decay=1e-4",
            "data.subset=",
            "train.epochs=3",
            "model.kwargs.drop_rate=0.1",
        ],
    )
    cfg = parse_train_config(raw)
    assert cfg.optim.lr == 0.1 and cfg.optim.adaptive is True
    assert cfg.tracking.wandb.tags == ["a", "b"]
    assert cfg.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.data.subset is None and cfg.train.epochs == 3
    assert cfg.model.kwargs == {"drop_rate": 0.1}
    assert MINIMAL == {"data": {"dataset": "digits"}}  # input left alone


def test_override_of_unknown_key_fails_validation():
    with pytest.raises(UserError, match=r"unknown key 'optim.lrr' \(did you mean 'lr'\?\)"):
        parse_train_config(apply_overrides(MINIMAL, ["optim.lrr=0.1"]))


@pytest.mark.parametrize("item", ["optim.lr", "=3", "optim..lr=1", "data.dataset.x=1"])
def test_malformed_overrides(item):
    with pytest.raises(UserError, match="--set"):
        apply_overrides(MINIMAL, [item])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "file is empty"),
        ("# only a comment\n", "file is empty"),
        ("- a\n- b\n", "top level must be a mapping of keys (got a list)"),
        ("just a string\n", "top level must be a mapping of keys (got a string)"),
        ("name: x\ndata: {dataset: digits\nmodel: x\n", ":3:6: invalid YAML"),
        ("name: x\n  bad indent: 1\n", ":2:13: invalid YAML"),
        ("name: x\nname: y\n", ":2:1: invalid YAML: duplicate key 'name'"),
    ],
)
def test_bad_files(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_yaml(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: no such file"):
        load_train_config(tmp_path / "nope.yaml")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_yaml(tmp_path)


def test_load_names_the_file(tmp_path):
    path = write(tmp_path, "data: {dataset: digits}\noptim: {rho: -1}\n")
    with pytest.raises(UserError, match=r"config.yaml: optim.rho: .* \(got -1\)$"):
        load_train_config(path)
    assert load_train_config(path, ["optim.rho=0"]).optim.rho == 0


def test_base_optimizer_names_come_from_timm():
    check_optimizer_name("adamw")
    check_optimizer_name("lookahead_sgd")
    with pytest.raises(UserError, match=r"unknown timm optimizer 'adamww' \(did you mean 'adamw'"):
        check_optimizer_name("adamww")


def _names_imported_from(module: str) -> set[tuple[str, str]]:
    """(file, name) for every ``from <module> import name`` in the repository's Python files."""
    import ast

    from helpers import REPO

    found = set()
    for folder in ("msam", "sweeps", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module == module and not node.level:
                    found.update((str(path.relative_to(REPO)), a.name) for a in node.names)
    return found


def test_every_name_imported_from_the_package_is_there():
    """msam.config is a package (schema, loading, messages, checks); what code imports from it,
    at any depth of the repository, resolves, and its public names are in ``__all__``."""
    import msam.config

    imported = _names_imported_from("msam.config")
    assert len(imported) > 20  # the scan sees the real imports (sweeps.spec alone has 16)
    missing = sorted(
        f"{where}: {name}" for where, name in imported if not hasattr(msam.config, name)
    )
    assert not missing, missing
    public = {name for _, name in imported if not name.startswith("_")}
    assert public <= set(msam.config.__all__)
    assert all(hasattr(msam.config, name) for name in msam.config.__all__)
