"""The config system: shipped YAML files, --set overrides (nesting, coercion, errors), malformed YAML."""
from __future__ import annotations

import argparse

import pytest

from pipeline.commands.common import add_config_args, add_dataset_args, config_from_args
from pipeline.config import CONFIG_DIR, Config, config_digest, load_config
from pipeline.errors import ConfigError

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_three_configs_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"toy", "cityscapes", "coco"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.dataset.name == path.stem.split("_")[0]   # coco_cpu.yaml is COCO-format data too
    # Every shipped config trains the class-agnostic mask head (issue 25).
    assert cfg.student.class_agnostic_mask


def test_real_data_configs_start_from_imagenet_weights():
    for name, backbone in (("cityscapes", "resnet50"), ("coco", "resnet50"), ("coco_cpu", "mobilenet_v2")):
        student = load_config(CONFIG_DIR / f"{name}.yaml").student
        assert (student.backbone, student.weights) == (backbone, "imagenet"), name


def test_cityscapes_config_has_the_papers_settings():
    obj = load_config(CONFIG_DIR / "cityscapes.yaml").teacher.objectives
    assert (obj.delta_color, obj.gamma_color, obj.delta_depth, obj.gamma_depth) == (2.5, 1.5, 3.5, 2.5)
    assert (obj.lambda_color, obj.lambda_depth, obj.depth_thresh, obj.warmup_iters) == (1.0, 0.1, 0.01, 10000)


def test_set_nested_keys_and_coercion():
    cfg = load_config(CONFIG_DIR / "toy.yaml", [
        "teacher.crf.iters=5",
        "dataset.toy.train=3",
        "dataset.min_box_side=2",               # int -> float field
        "dataset.strict=true",
        "run.name=123",                          # number -> str field
        "student.min_size=[128, 160]",
        "teacher.objectives.lambda_depth=1e-2",  # YAML 1.1 reads this as a string; the float field parses it
        "dataset.toy.size=64x128",
    ])
    assert cfg.teacher.crf.iters == 5 and isinstance(cfg.teacher.crf.iters, int)
    assert cfg.dataset.toy.train == 3 and cfg.dataset.toy.val == 8      # siblings keep the YAML value
    assert cfg.dataset.min_box_side == 2.0 and isinstance(cfg.dataset.min_box_side, float)
    assert cfg.dataset.strict is True
    assert cfg.run.name == "123"
    assert cfg.student.min_size == [128, 160]
    assert cfg.teacher.objectives.lambda_depth == 0.01
    assert cfg.dataset.toy.size == "64x128"


def test_precedence_defaults_yaml_flags_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  name: coco\n  root: /from/yaml\n  split: val\nlabel:\n  workers: 3\n")
    cfg = load_config(path, ["label.workers=5"], extra={"dataset": {"root": "/from/flag"}})
    assert cfg.dataset.root == "/from/flag"       # flags beat the file
    assert cfg.dataset.split == "val"             # the file beats the defaults
    assert cfg.label.workers == 5                 # --set beats everything
    assert cfg.label.batch_images == Config().label.batch_images
    cfg2 = load_config(path, ["dataset.root=/from/set"], extra={"dataset": {"root": "/from/flag"}})
    assert cfg2.dataset.root == "/from/set"


def test_cli_args_to_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    add_config_args(parser)
    args = parser.parse_args(["--dataset", "coco", "--data-root", str(tmp_path), "--ann", "a.json", "--strict",
                              "--set", "label.workers=7", "--set", "teacher.roi_size=28"])
    cfg = config_from_args(args)
    assert (cfg.dataset.name, cfg.dataset.root, cfg.dataset.ann, cfg.dataset.strict) == \
        ("coco", str(tmp_path), "a.json", True)
    assert cfg.label.workers == 7 and cfg.teacher.roi_size == 28
    assert cfg.run.name == "coco"                 # from configs/coco.yaml, the default for --dataset coco


def _cli_parser(split_default: str | None = "train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataset_args(parser, split_default=split_default)
    add_config_args(parser)
    return parser


def test_config_file_is_not_overridden_by_flag_defaults(tmp_path):
    """A --config naming a dataset, root and split is used as written when --dataset / --split are not given
    (they used to default to toy / train and silently replace the file's values)."""
    path = tmp_path / "mine.yaml"
    path.write_text(f"dataset:\n  name: cityscapes\n  root: {tmp_path}\n  split: val\nrun:\n  name: mine\n")
    cfg = config_from_args(_cli_parser().parse_args(["--config", str(path)]))
    assert (cfg.dataset.name, cfg.dataset.root, cfg.dataset.split) == ("cityscapes", str(tmp_path), "val")
    assert cfg.run.name == "mine"
    # Flags that are given still win over the file.
    cfg = config_from_args(_cli_parser().parse_args(["--config", str(path), "--dataset", "coco", "--split",
                                                     "train", "--data-root", "/elsewhere"]))
    assert (cfg.dataset.name, cfg.dataset.root, cfg.dataset.split) == ("coco", "/elsewhere", "train")
    assert cfg.run.name == "mine"                 # the file named by --config, not configs/coco.yaml


def test_default_config_file_follows_dataset_flag_else_toy():
    cfg = config_from_args(_cli_parser().parse_args([]))
    assert (cfg.dataset.name, cfg.dataset.split, cfg.run.name) == ("toy", "train", "toy")
    cfg = config_from_args(_cli_parser().parse_args(["--dataset", "cityscapes"]))
    assert (cfg.dataset.name, cfg.run.name) == ("cityscapes", "cityscapes")
    args = _cli_parser(split_default=None).parse_args(["--dataset", "coco"])
    assert args.split is None and args.dataset == "coco"


def test_dataset_and_split_flags_default_to_none_with_effective_defaults_in_help():
    parser = _cli_parser()
    args = parser.parse_args([])
    assert args.dataset is None and args.split is None and args.config is None
    text = " ".join(parser.format_help().split())
    assert "default: dataset.name of the --config file, else toy" in text
    assert "default: dataset.split of the config, train in the shipped configs" in text
    assert "default: configs/<--dataset>.yaml, configs/toy.yaml without --dataset" in text
    assert "default: every split of the dataset" in " ".join(_cli_parser(None).format_help().split())


@pytest.mark.parametrize("item, message", [
    ("label.workers=abc", "label.workers: expected an integer, got 'abc'"),
    ("dataset.strict=maybe", "dataset.strict: expected true or false, got 'maybe'"),
    ("student.min_size=128", "student.min_size: expected a list"),
    ("teacher.crf=5", "teacher.crf: expected a mapping of CRFConfig fields"),
])
def test_set_bad_type_names_the_override(item, message):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR / "toy.yaml", [item])
    assert info.value.where == "--set"
    assert item in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("item, suggestion", [
    ("dataset.rooot=/x", "did you mean 'dataset.root'?"),
    ("teacher.crf.itres=4", "did you mean 'teacher.crf.iters'?"),
    ("datset.root=/x", "did you mean 'dataset'?"),
])
def test_set_unknown_key_suggests_the_closest(item, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR / "toy.yaml", [item])
    text = str(info.value)
    assert info.value.where == "--set" and "toy.yaml" not in text
    assert "unknown key" in text and suggestion in text and "\n" not in text


def test_set_unknown_key_without_a_close_match_lists_the_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*workers.*batch_images"):
        load_config(None, ["label.zzzzzz=1"])


def test_set_malformed_item():
    with pytest.raises(ConfigError, match="--set: 'workers' is not of the form section.key=value"):
        load_config(None, ["workers"])


def test_yaml_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("label:\n  wrokers: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.where == str(path)
    assert "unknown key 'wrokers'" in str(info.value) and "did you mean 'label.workers'?" in str(info.value)


def test_yaml_bad_type_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher:\n  crf:\n    iters: ten\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: teacher\.crf\.iters: expected an integer, got 'ten'"):
        load_config(path)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset:\n  name: toy\nlabel:\n  workers: [1, 2\n  batch_images: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.where == str(path)
    assert "malformed YAML at line" in info.value.problem and "\n" not in str(info.value)
    line = int(info.value.problem.split("at line ")[1].split(":")[0])
    assert 4 <= line <= 5


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_digest_is_stable_and_sensitive():
    a, b = load_config(None), load_config(None)
    assert config_digest(a.teacher) == config_digest(b.teacher)
    assert config_digest(a.teacher) != config_digest(load_config(None, ["teacher.crf.iters=3"]).teacher)


def test_occlusion_setting_reads_yaml_off_as_the_word(tmp_path):
    # YAML 1.1 turns a bare `off` into false; the teacher's setting still means the word.
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  occlusion: off\n")
    assert load_config(path, []).teacher.occlusion == "off"
    assert load_config(path, ["teacher.occlusion=joint"]).teacher.occlusion == "joint"
    assert load_config(path, ["teacher.occlusion=off"]).teacher.occlusion == "off"
    with pytest.raises(ConfigError, match="teacher.occlusion: expected one of joint, off, got 'maybe'"):
        load_config(path, ["teacher.occlusion=maybe"])
    with pytest.raises(ConfigError, match="teacher.occlusion: expected one of joint, off, got True"):
        load_config(path, ["teacher.occlusion=true"])
