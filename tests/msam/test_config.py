"""Train config: defaults, the design's example, one-line errors naming the key for bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from msam.config import (
    DATASETS,
    MAX_BATCH,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_EPOCHS,
    MAX_FILE_NAME,
    MAX_NODES,
    SEED_LIMIT,
    SyntheticConfig,
    TrainConfig,
    apply_overrides,
    check_optimizer_name,
    load_train_config,
    load_yaml,
    parse_train_config,
)
from msam.config.messages import MAX_MESSAGE, bounded
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


# ----------------------------------------------------------------------------- bounds


def nested_aliases(levels: int) -> str:
    """``levels`` anchors, each a list of nine aliases of the one before: 9**levels strings."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "data: {dataset: digits}\nmodel:\n  kwargs:\n" + "".join(f"    {x}\n" for x in lines)


def test_aliases_within_the_bound_load_as_written(tmp_path):
    raw = load_yaml(write(tmp_path, nested_aliases(4)))  # 9**4 = 6561 strings
    kwargs = raw["model"]["kwargs"]
    assert len(kwargs["a3"]) == 9 and kwargs["a3"][0][0][0] == ["x"] * 9
    assert parse_train_config(raw).model.kwargs == kwargs


@pytest.mark.parametrize("levels", [6, 10, 30])
def test_an_alias_bomb_is_refused_while_it_is_read(tmp_path, levels):
    path = write(tmp_path, nested_aliases(levels))
    with pytest.raises(UserError) as info:
        load_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}:9:") and f"expands to more than {MAX_NODES}" in message
    assert len(message) <= MAX_MESSAGE


def test_many_plain_values_count_too(tmp_path):
    path = write(tmp_path, "data: {dataset: digits}\nkeys: [" + "1, " * MAX_NODES + "1]\n")
    with pytest.raises(UserError, match=f"refused: expands to more than {MAX_NODES}"):
        load_yaml(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: &a [1, *a]\n", ":1:11: refused: alias *a is used inside the node it names"),
        ("a: &a {b: *a}\n", ":1:11: refused: alias *a is used inside the node it names"),
        ("a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n", "nested deeper than 50"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", f"nested deeper than {MAX_DEPTH} levels"),
        ("epochs: " + "9" * 5000 + "\n", "invalid YAML: Exceeds the limit"),
    ],
    ids=["self-list", "self-mapping", "too-deep", "far-too-deep", "long-int"],
)
def test_structures_a_config_never_needs_are_refused(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_yaml(path)
    assert str(info.value).startswith(str(path)) and expected in str(info.value)


def test_nesting_within_the_bound_loads(tmp_path):
    depth = MAX_DEPTH - 2  # the top mapping and its key take the other two levels
    raw = load_yaml(write(tmp_path, "a: " + "[" * depth + "1" + "]" * depth + "\n"))
    value = raw["a"]
    for _ in range(depth - 1):
        (value,) = value
    assert value == [1]


def test_a_file_over_the_size_bound_is_not_read(tmp_path):
    path = write(tmp_path, "# padding\n" * (MAX_BYTES // 10) + "data: {dataset: digits}\n")
    with pytest.raises(UserError, match="larger than 1 MiB"):
        load_yaml(path)
    path.write_text("# padding\n" * (MAX_BYTES // 20) + "data: {dataset: digits}\n")
    assert load_yaml(path) == {"data": {"dataset": "digits"}}


def test_an_alias_bomb_in_an_override_is_refused():
    bomb = "{a0: &a0 [x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)
    )
    with pytest.raises(UserError, match=r"^--set model.kwargs: refused: expands to more than"):
        apply_overrides(MINIMAL, [f"model.kwargs={bomb}}}"])
    assert apply_overrides(MINIMAL, ["model.kwargs={a: &a [1], b: *a}"])["model"]["kwargs"] == {
        "a": [1],
        "b": [1],
    }


def test_messages_are_cut_to_a_bounded_line():
    assert bounded("short\nline") == "short line"
    cut = bounded("x" * 10_000)
    assert len(cut) == MAX_MESSAGE and cut.endswith("…")
    message = error_of({**MINIMAL, "optim": {"x" * 100_000: 1}, "train": {"epochs": 0}})
    assert len(message) <= MAX_MESSAGE and message.endswith("(+1 more)")
    assert "unknown key 'optim.xxx" in message and "…" in message


def test_a_long_override_is_shown_short():
    with pytest.raises(UserError) as info:
        apply_overrides(MINIMAL, ["x" * 100_000])
    assert len(str(info.value)) <= MAX_MESSAGE and "expected KEY=VALUE" in str(info.value)


@pytest.mark.parametrize("key", ["train.seed", "data.split_seed", "data.synthetic.seed"])
def test_seeds_are_non_negative_and_below_2_to_the_31(key):
    raw = with_value(key, 0)
    if key.startswith("data.synthetic"):
        raw["data"]["dataset"] = "synthetic"
    for bad, expected in [(-1, "greater than or equal to 0"), (SEED_LIMIT, "less than 2147483648")]:
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = bad
        assert f"{key}: Input should be {expected}" in error_of(raw)
    node[last] = SEED_LIMIT - 1
    parse_train_config(raw)


def test_warmup_may_last_the_whole_run_but_no_longer():
    raw = with_value("train", {"epochs": 3, "warmup_epochs": 3})
    assert parse_train_config(raw).train.warmup_epochs == 3
    raw["train"]["warmup_epochs"] = 4
    assert "train.warmup_epochs: 4 is more than the run's epochs (3)" in error_of(raw)
    raw["train"]["epochs"] = 0  # the invalid epochs is the one problem reported
    assert (
        error_of(raw)
        == "cfg.yaml: train.epochs: Input should be greater than or equal to 1 (got 0)"
    )


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("train.epochs", MAX_EPOCHS, MAX_EPOCHS + 1),
        ("train.batch_size", MAX_BATCH, MAX_BATCH + 1),
        ("train.eval_batch_size", MAX_BATCH, MAX_BATCH + 1),
        ("optim.micro_batches", MAX_BATCH, MAX_BATCH + 1),
        ("data.img_size", 4096, 4097),
        ("model.name", "m" * 200, "m" * 201),
        ("optim.base", "b" * 100, "b" * 101),
        ("data.root", "r" * 4096, "r" * 4097),
        ("tracking.wandb.project", "p" * 128, "p" * 129),
        ("name", "n" * MAX_FILE_NAME, "n" * (MAX_FILE_NAME + 1)),
    ],
)
def test_sizes_are_bounded(key, good, bad):
    raw = with_value(key, good)
    if key == "data.img_size":
        raw["data"] = {"dataset": "imagefolder", "root": "/data", "img_size": good}
    if key == "train.batch_size":
        raw["train"]["eval_batch_size"] = 1
    parse_train_config(raw)
    raw = copy.deepcopy(raw)
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = bad
    message = error_of(raw)
    assert message.startswith(f"cfg.yaml: {key}: ") and len(message) <= MAX_MESSAGE


def test_a_run_name_is_one_line():
    assert "name: use letters, digits" in error_of({**MINIMAL, "name": "run\n"})
    assert f"at most {MAX_FILE_NAME} characters" in error_of({**MINIMAL, "name": "n" * 256})


def test_a_synthetic_data_set_must_fit_in_memory():
    raw = {"data": {"dataset": "synthetic", "synthetic": {"img_size": 512}}}
    message = error_of(raw)
    assert "data.synthetic: 12000 images of 3x512x512" in message and "at most 4 GiB" in message
    raw["data"]["synthetic"].update(num_train=1000, num_test=100)
    assert parse_train_config(raw).data.synthetic.img_size == 512


@pytest.mark.parametrize("char", list("/\\#?%:"))
@pytest.mark.parametrize("key", ["project", "entity"])
def test_wandb_names_w_and_b_refuses(key, char):
    message = error_of(with_value(f"tracking.wandb.{key}", f"a{char}b"))
    assert f"tracking.wandb.{key}: W&B refuses" in message and repr(char) in message


def test_wandb_tags_are_1_to_64_characters():
    assert parse_train_config(with_value("tracking.wandb.tags", ["t" * 64])).tracking
    for tag in ["", "t" * 65]:
        message = error_of(with_value("tracking.wandb.tags", ["ok", tag]))
        assert "tracking.wandb.tags[1]: W&B tags are 1 to 64 characters" in message
