"""Project files: round trip, and every validation rule giving an error that names the field and the value."""

import json
import math

import pytest

from engine.config import SCHEMA_VERSION, ConfigError, ProjectConfig, from_dict, load_project, save_project, validate


@pytest.fixture()
def data_dir(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir(parents=True)
    return tmp_path


def base(**sections):
    d = {"schema_version": 1, "name": "t", "data": {"path": "data"}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return d


def problems_of(data, base_dir):
    with pytest.raises(ConfigError) as info:
        from_dict(data, base_dir=base_dir)
    return [str(p) for p in info.value.problems], str(info.value)


def test_defaults_are_valid_and_round_trip(data_dir):
    cfg = from_dict(base(), base_dir=data_dir)
    assert cfg.loader.batch_size == 32 and cfg.optimizer.lr == 1e-3
    path = data_dir / "p.json"
    save_project(cfg, path)
    again = load_project(path)
    assert again.to_dict() == cfg.to_dict()
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert "base_dir" not in json.loads(path.read_text())


def test_relative_paths_resolve_against_the_project_folder(data_dir):
    (data_dir / "sub").mkdir()
    path = data_dir / "sub" / "p.json"
    path.write_text(json.dumps(base(data={"path": "../data"})))
    cfg = load_project(path)
    assert cfg.resolve(cfg.data.path) == (data_dir / "data").resolve()


BAD_VALUES = [
    ({"loader": {"batch_size": 0}}, "loader.batch_size", "0"),
    ({"loader": {"batch_size": -4}}, "loader.batch_size", "-4"),
    ({"loader": {"batch_size": 2.5}}, "loader.batch_size", "2.5"),
    ({"loader": {"num_workers": -1}}, "loader.num_workers", "-1"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr", "0"),
    ({"optimizer": {"lr": -0.1}}, "optimizer.lr", "-0.1"),
    ({"optimizer": {"lr": "nan"}}, "optimizer.lr", "nan"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr", "fast"),
    ({"optimizer": {"name": "adamax"}}, "optimizer.name", "adamax"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas", "0.9"),
    ({"optimizer": {"momentum": 1.5}}, "optimizer.momentum", "1.5"),
    ({"optimizer": {"nesterov": True, "momentum": 0.0, "name": "sgd"}}, "optimizer.nesterov", "true"),
    ({"optimizer": {"backbone_lr_mult": -1}}, "optimizer.backbone_lr_mult", "-1"),
    ({"loader": {"sampler": {"name": "shuffled"}}}, "loader.sampler.name", "shuffled"),
    ({"loader": {"sampler": {"name": "random", "num_samples": 0}}}, "loader.sampler.num_samples", "0"),
    ({"loader": {"sampler": {"name": "weighted_random"}}}, "loader.sampler.weights", "balanced"),
    ({"loader": {"sampler": {"name": "weighted_random", "weights": "even"}}}, "loader.sampler.weights", "even"),
    ({"loader": {"sampler": {"name": "weighted_random", "weights": [0, 0]}}}, "loader.sampler.weights", "0"),
    ({"loader": {"sampler": {"name": "random", "weights": "balanced"}}}, "loader.sampler.weights", "random"),
    ({"loader": {"sampler": {"name": "subset_random", "indices": [-1]}}}, "loader.sampler.indices", "-1"),
    ({"loader": {"sampler": {"name": "distributed", "rank": 2, "num_replicas": 2}}}, "loader.sampler.rank", "2"),
    (
        {"loader": {"shuffle": True, "sampler": {"name": "weighted_random", "weights": "balanced"}}},
        "loader.shuffle",
        "weighted_random",
    ),
    ({"loader": {"shuffle": True, "sampler": {"name": "sequential"}}}, "loader.shuffle", "sequential"),
    ({"loader": {"collate": "stack"}}, "loader.collate", "stack"),
    ({"data": {"keep_aspect": True}}, "data.keep_aspect", "pad"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction", "1.0"),
    ({"data": {"val_fraction": -0.1}}, "data.val_fraction", "-0.1"),
    ({"data": {"image_size": 2}}, "data.image_size", "2"),
    ({"data": {"std": [0.0]}}, "data.std[0]", "0.0"),
    ({"data": {"mean": [0.1, 0.2]}}, "data.mean", "0.2"),
    ({"data": {"kind": "zip"}}, "data.kind", "zip"),
    ({"data": {"task": "segmentation"}}, "data.task", "segmentation"),
    ({"data": {"path": "missing"}}, "data.path", "missing"),
    ({"data": {"path": ""}}, "data.path", "empty"),
    ({"data": {"val_path": "nowhere"}}, "data.val_path", "nowhere"),
    ({"data": {"kind": "folder", "task": "regression"}}, "data.task", "regression"),
    ({"data": {"augment": {"rotation": 400}}}, "data.augment.rotation", "400"),
    ({"model": {"backbone": "resnet1"}}, "model.backbone", "resnet1"),
    ({"model": {"weights": "IMAGENET9K"}}, "model.weights", "IMAGENET9K"),
    ({"model": {"backbone": "vit_b_16"}, "data": {"image_size": 40}}, "data.image_size", "multiple of 16"),
    (
        {"model": {"backbone": "vit_b_16", "weights": "DEFAULT"}, "data": {"input_size": 112}},
        "data.input_size",
        "position embeddings",
    ),
    ({"data": {"input_size": 16}}, "data.input_size", "16"),
    ({"model": {"weights_file": "w.pt"}}, "model.weights_file", "w.pt"),
    ({"model": {"freeze": "most"}}, "model.freeze", "most"),
    ({"model": {"freeze": "up_to"}}, "model.freeze_up_to", "up_to"),
    ({"loss": {"name": "hinge"}}, "loss.name", "hinge"),
    ({"loss": {"label_smoothing": 1.0}}, "loss.label_smoothing", "1.0"),
    ({"loss": {"name": "mse", "label_smoothing": 0.1}}, "loss.label_smoothing", "mse"),
    ({"loss": {"class_weights": "fair"}}, "loss.class_weights", "fair"),
    ({"loss": {"name": "l1", "class_weights": "balanced"}}, "loss.class_weights", "l1"),
    ({"loss": {"name": "cross_entropy"}, "data": {"task": "regression", "kind": "csv"}}, "loss.name", "cross_entropy"),
    ({"schedule": {"name": "linear"}}, "schedule.name", "linear"),
    ({"schedule": {"step_size": 0}}, "schedule.step_size", "0"),
    ({"schedule": {"pct_start": 1.0}}, "schedule.pct_start", "1.0"),
    ({"train": {"epochs": 0}}, "train.epochs", "0"),
    ({"train": {"device": "tpu"}}, "train.device", "tpu"),
    ({"train": {"precision": "int8"}}, "train.precision", "int8"),
    ({"train": {"grad_clip_norm": 0}}, "train.grad_clip_norm", "0"),
    ({"train": {"seed": -1}}, "train.seed", "-1"),
    ({"train": {"deterministic": "yes"}}, "train.deterministic", "yes"),
    ({"output": {"dir": ""}}, "output.dir", "empty"),
    ({"output": {"run_name": "a/b"}}, "output.run_name", "a/b"),
    ({"data": "digits"}, "data", "digits"),
]


@pytest.mark.parametrize("change, field, value", BAD_VALUES, ids=[b[1] + "=" + b[2] for b in BAD_VALUES])
def test_every_bad_value_is_refused_naming_field_and_value(data_dir, change, field, value):
    problems, text = problems_of(base(**change), data_dir)
    assert any(field in p and value.lower() in p.lower() for p in problems), problems
    assert "invalid project" in text


def test_unknown_keys_are_errors_at_every_level(data_dir):
    problems, _ = problems_of(base(colour="red", loader={"batchsize": 8}, loss={"smoothing": 0.1}), data_dir)
    text = "\n".join(problems)
    assert "colour: unknown key" in text
    assert "loader.batchsize: unknown key" in text and "batch_size" in text
    assert "loss.smoothing: unknown key" in text


def test_all_problems_are_reported_together(data_dir):
    problems, text = problems_of(base(loader={"batch_size": 0}, optimizer={"lr": -1}, train={"epochs": 0}), data_dir)
    assert len(problems) == 3
    assert "3 problems" in text


def test_newer_schema_version_is_refused_with_advice(data_dir):
    problems, _ = problems_of(base(schema_version=SCHEMA_VERSION + 1), data_dir)
    assert "newer" in problems[0] and str(SCHEMA_VERSION + 1) in problems[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"schema_version": "one"}', "schema_version"),
    ],
)
def test_malformed_project_files(tmp_path, text, expected):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_project(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_missing_project_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_project(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="is a folder"):
        load_project(tmp_path)


def test_nan_in_a_number_is_refused_after_type_conversion(data_dir):
    cfg = from_dict(base(), base_dir=data_dir)
    cfg.optimizer.lr = math.nan
    assert any(p.path == "optimizer.lr" and "finite" in p.message for p in validate(cfg))


def test_copy_is_independent(data_dir):
    cfg = from_dict(base(), base_dir=data_dir)
    clone = cfg.copy()
    clone.loader.batch_size = 7
    assert cfg.loader.batch_size == 32 and clone.base_dir == cfg.base_dir


def test_example_projects_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json")):
        assert isinstance(load_project(path), ProjectConfig)


@pytest.mark.parametrize("change, field, value", BAD_VALUES, ids=[b[1] + "=" + b[2] for b in BAD_VALUES])
def test_every_problem_carries_the_path_of_its_field(data_dir, change, field, value):
    with pytest.raises(ConfigError) as info:
        from_dict(base(**change), base_dir=data_dir)
    paths = {p.path for p in info.value.problems}
    assert (
        field in paths
        or field.split("[")[0] in paths
        or (field == "data.keep_aspect" and "loader.collate" in paths)
        or (field == "optimizer.nesterov" and "optimizer.nesterov" in paths)
    ), (field, info.value.problems)


def test_a_value_set_in_code_is_checked_against_its_declaration(data_dir):
    cfg = from_dict(base(), base_dir=data_dir)
    cfg.distributed.timeout_s = 5
    cfg.loader.sampler.num_samples = 3  # only used by 'random' and 'weighted_random': the default sampler is fine
    assert [(p.path, p.message) for p in validate(cfg)] == [
        ("distributed.timeout_s", "distributed.timeout_s = 5: must be >= 10")
    ]
    cfg.loader.sampler.name = "sequential"
    (unused,) = [p for p in validate(cfg) if p.path == "loader.sampler.num_samples"]
    assert (
        "3" in unused.message and "'random' or 'weighted_random'" in unused.message and "'sequential'" in unused.message
    )


def test_a_base_dir_key_in_the_file_is_an_unknown_key(data_dir):
    problems, _ = problems_of(base(base_dir="/elsewhere"), data_dir)
    assert problems and problems[0].startswith("base_dir: unknown key")


def test_the_readme_table_is_generated_from_the_declarations():
    from pathlib import Path

    from engine.config import readme_table
    from engine.settings import replace_between

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert replace_between(readme, readme_table()) == readme, "README's project-file table is stale: run `make docs`"
    assert "| `loader.batch_size` | `32` |" in readme_table()
