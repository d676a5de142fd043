"""Flag parsing into the typed config, validation messages that name the flag, and the
sections of the config (config.json's grouped layout, the older flat one)."""

import pytest
from absl import flags

from dino_keras.config import (
    RENAMED_FIELDS,
    SECTION_NAMES,
    SECTION_OF,
    SECTIONS,
    ConfigError,
    TrainConfig,
    config_from_flags,
    define_flags,
)


def parse(*argv):
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["train.py", *argv])
    return config_from_flags(flag_values)


def test_defaults_are_the_reference_values():
    config = parse()
    assert (config.arch, config.patch_size, config.out_dim) == ("vit_small", 16, 65536)
    assert (config.lr, config.min_lr, config.warmup_epochs, config.epochs) == (
        0.0005,
        1e-6,
        10,
        100,
    )
    assert (config.weight_decay, config.weight_decay_end, config.clip_grad) == (0.04, 0.4, 3.0)
    assert config.global_crops_scale == (0.4, 1.0) and config.local_crops_scale == (0.05, 0.4)
    assert (config.local_crops_number, config.momentum_teacher, config.freeze_last_layer) == (
        8,
        0.996,
        1,
    )
    assert config.vit_dims == (384, 12, 6)


def test_flag_values_and_lists_are_typed():
    config = parse(
        "--arch=vit_base",
        "--global_crops_scale=0.5,1",
        "--norm_last_layer=false",
        "--embed_dim=96",
        "--num_heads=3",
    )
    assert config.global_crops_scale == (0.5, 1.0)
    assert config.norm_last_layer is False
    assert config.vit_dims == (96, 12, 3)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--arch=vit_huge"], "--arch"),
        (["--optimizer=adam"], "--optimizer"),
        (["--local_crops_scale=0.05,0.5"], "--local_crops_scale"),
        (["--global_crops_scale=0,1"], "--global_crops_scale"),
        (["--global_crops_scale=0.4"], "--global_crops_scale"),
        (["--global_crops_scale=a,b"], "--global_crops_scale"),
        (["--global_crops_size=100"], "--global_crops_size"),
        (["--local_crops_size=90"], "--local_crops_size"),
        (["--batch_size_per_gpu=0"], "--batch_size_per_gpu"),
        (["--warmup_epochs=200"], "--warmup_epochs"),
        (["--use_fp16", "--precision=mixed_bfloat16"], "--use_fp16"),
        (["--momentum_teacher=1.5"], "--momentum_teacher"),
        (["--embed_dim=100", "--num_heads=3"], "--num_heads"),
        (["--data_path="], "--data_path"),
        (["--centering=sinkhorn"], "--centering"),
        (["--koleo_loss_weight=-1"], "--koleo_loss_weight"),
        (["--blur_sigma=0,1"], "--blur_sigma"),
        (["--blur_sigma=0.1,3"], "--blur_sigma"),
        (["--train_steps=-5"], "--train_steps"),
    ],
)
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=f"^{flag}"):
        parse(*argv)


def test_train_steps_sets_the_epochs_from_the_data_size():
    config = parse("--train_steps=1000", "--epochs=1", "--warmup_epochs=1")
    assert config.with_epochs_for(23).epochs == 44  # ceil(1000 / 23)
    assert config.with_epochs_for(1000).epochs == 1
    assert (
        parse("--epochs=7", "--warmup_epochs=1").with_epochs_for(23).epochs == 7
    )  # no --train_steps: --epochs
    with pytest.raises(ConfigError, match=r"^--warmup_epochs.*--train_steps=1000 at 500 steps"):
        parse("--train_steps=1000", "--epochs=20", "--warmup_epochs=10").with_epochs_for(500)


def test_multicrop_can_be_disabled():
    config = parse("--local_crops_number=0", "--local_crops_scale=0.05,0.9")
    assert config.local_crops_number == 0


def test_to_json_round_trips_fields():
    import json

    config = TrainConfig.from_dict({"arch": "vit_tiny", "global_crops_scale": "0.5,1"})
    saved = json.loads(config.to_json())
    assert saved["model"]["arch"] == "vit_tiny" and saved["crops"]["global_crops_scale"] == [0.5, 1]
    assert TrainConfig.from_dict(saved) == config


def test_every_recipe_in_configs_parses_and_validates(monkeypatch):
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)  # nested --flagfile paths are relative to the project root
    recipes = sorted(glob.glob("configs/*.cfg"))
    assert len(recipes) >= 6
    for recipe in recipes:
        assert open(recipe).readline().startswith("#"), f"{recipe} lacks its header comment"
        assert parse(f"--flagfile={recipe}").epochs > 0
    resnet = parse("--flagfile=configs/resnet50.cfg")
    boosted = parse("--flagfile=configs/vit_small_300ep_boosted.cfg")
    assert (resnet.optimizer, resnet.lr, resnet.local_crops_scale) == ("sgd", 0.03, (0.05, 0.14))
    assert (boosted.teacher_temp, boosted.warmup_teacher_temp_epochs, boosted.norm_last_layer) == (
        0.07,
        30,
        False,
    )


def test_unknown_strategy_is_refused_up_front():
    with pytest.raises(ConfigError, match="^--strategy"):
        parse("--strategy=horovod")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--cpu_replicas=2"], "cpu_replicas"),
        (["--strategy=mirrored", "--cpu_replicas=-1"], "cpu_replicas"),
        (["--tpu=my-tpu"], "tpu"),
        (["--backup_every_steps=-5"], "backup_every_steps"),
        (["--num_workers=-1"], "num_workers"),
    ],
)
def test_distribution_backup_and_loader_flags_are_checked(args, flag):
    with pytest.raises(ConfigError, match=f"^--{flag}"):
        parse(*args)


def test_from_dict_coerces_like_the_flags_and_names_unknown_keys():
    config = TrainConfig.from_dict(
        {"global_crops_scale": ["0.5", "1"], "norm_last_layer": "false", "lr": 1, "depth": "3"}
    )
    assert config.global_crops_scale == (0.5, 1.0) and config.norm_last_layer is False
    assert (config.lr, config.depth) == (1.0, 3) and isinstance(config.lr, float)
    with pytest.raises(ConfigError, match="^--no_such_flag: unknown setting"):
        TrainConfig.from_dict({"no_such_flag": 1})
    with pytest.raises(ConfigError, match="^--depth: expected an integer"):
        TrainConfig.from_dict({"depth": 2.5})
    with pytest.raises(ConfigError, match="^--global_crops_scale: expected numbers"):
        TrainConfig.from_dict({"global_crops_scale": "a,b"})


def test_config_from_flagfile_reads_the_tiny_config_with_overrides():
    import os

    from dino_keras.config import config_from_flagfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "configs", "tiny.cfg")
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["train.py", f"--flagfile={path}"])
    assert config_from_flagfile(path) == config_from_flags(flag_values)
    config = config_from_flagfile(path, depth=3, local_crops_number=0)
    assert (config.embed_dim, config.depth, config.local_crops_number) == (32, 3, 0)
    with pytest.raises(ConfigError, match="^--no_such_flag"):
        config_from_flagfile(path, no_such_flag=1)


def test_former_flag_names_are_deprecated_aliases(capsys):
    config = parse("--knn_k=5", "--knn_temperature=0.1")
    assert (config.nb_knn, config.temperature) == (5, 0.1)
    warnings = capsys.readouterr().err.splitlines()
    assert "WARNING: --knn_k is deprecated; use --nb_knn." in warnings
    assert "WARNING: --knn_temperature is deprecated; use --temperature." in warnings
    assert parse("--knn_k=5", "--nb_knn=5").nb_knn == 5
    with pytest.raises(flags.IllegalFlagValueError, match="give only --nb_knn"):
        parse("--knn_k=5", "--nb_knn=7")
    # Keys of an older run's config.json.
    assert TrainConfig.from_dict({"knn_k": 7, "knn_temperature": 0.2}).nb_knn == 7


def test_eval_scripts_limit_train_is_an_alias_of_limit_images(capsys):
    from dino_keras.run_loading import define_eval_data_flags

    flag_values = flags.FlagValues()
    define_eval_data_flags(flag_values, "Training images.")
    flag_values(["eval_knn.py", "--limit_train=16"])
    assert flag_values.limit_images == 16
    assert "--limit_train is deprecated; use --limit_images" in capsys.readouterr().err


# A config far from the defaults in every section, with ranges, booleans and strings.
CHANGED = {
    "arch": "vit_tiny",
    "patch_size": 8,
    "norm_last_layer": False,
    "local_crops_scale": (0.1, 0.3),
    "blur_sigma": (0.2, 1.5),
    "optimizer": "sgd",
    "lr": 0.03,
    "teacher_temp": 0.07,
    "centering": "sinkhorn_knopp",
    "data_path": "tfds:cifar10",
    "limit_images": 100,
    "output_dir": "runs/elsewhere",
    "deterministic": True,
    "strategy": "mirrored",
    "cpu_replicas": 2,
    "nb_knn": 5,
    "temperature": 0.1,
}


def test_every_field_is_in_exactly_one_section():
    import dataclasses

    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    in_sections = [name for names in SECTIONS.values() for name in names]
    assert len(in_sections) == len(set(in_sections)) == len(fields)
    assert set(in_sections) == set(fields)
    assert tuple(SECTIONS) == SECTION_NAMES
    assert SECTION_NAMES == (
        "model",
        "crops",
        "optimisation",
        "teacher",
        "data",
        "run",
        "evaluation",
    )
    assert all(SECTIONS.values())  # no empty section
    # A section named like a setting would make the grouped and the flat form ambiguous.
    assert not set(SECTION_NAMES) & (set(fields) | set(RENAMED_FIELDS))
    # The groups of the field comments in config.py.
    for name, section in [
        ("arch", "model"),
        ("drop_path_rate", "model"),
        ("global_crops_scale", "crops"),
        ("blur_sigma", "crops"),
        ("use_fp16", "optimisation"),
        ("optimizer", "optimisation"),
        ("momentum_teacher", "teacher"),
        ("koleo_loss_weight", "teacher"),
        ("data_path", "data"),
        ("num_workers", "data"),
        ("output_dir", "run"),
        ("stop_on_collapse", "run"),
        ("eval_data_path", "evaluation"),
        ("eval_batch_size", "evaluation"),
    ]:
        assert SECTION_OF[name] == section, name


def test_a_field_without_a_section_is_refused():
    import dataclasses

    from dino_keras.config import _model, _sections_of

    unsectioned = dataclasses.make_dataclass(
        "Unsectioned", [("arch", str, _model("vit_small", "")), ("extra", int, 0)]
    )
    with pytest.raises(TypeError, match="Unsectioned.extra"):
        _sections_of(unsectioned)
    named_like_a_section = dataclasses.make_dataclass("Ambiguous", [("model", str, _model("", ""))])
    with pytest.raises(TypeError, match="Ambiguous.model: a field named like a section"):
        _sections_of(named_like_a_section)


def test_to_sections_groups_every_value_and_round_trips():
    import json

    config = TrainConfig.from_dict(CHANGED)
    sections = config.to_sections()
    assert list(sections) == list(SECTION_NAMES)
    for section, values in sections.items():
        assert tuple(values) == SECTIONS[section]
        for name, value in values.items():
            assert value == getattr(config, name), name
    assert sections["model"]["arch"] == "vit_tiny" and sections["run"]["cpu_replicas"] == 2
    assert sections["crops"]["blur_sigma"] == (0.2, 1.5)
    assert TrainConfig.from_dict(sections) == config
    # Through JSON (ranges become lists), as config.json is written and read back.
    assert TrainConfig.from_dict(json.loads(json.dumps(sections))) == config
    # Missing sections and keys keep their defaults, as missing flat keys do.
    partial = TrainConfig.from_dict({"model": {"arch": "vit_tiny"}, "evaluation": {}})
    assert partial == TrainConfig(arch="vit_tiny")


def test_the_flat_form_of_older_runs_still_loads():
    import dataclasses
    import json

    config = TrainConfig.from_dict(CHANGED)
    flat = json.loads(json.dumps(dataclasses.asdict(config)))
    assert "arch" in flat and "model" not in flat
    assert TrainConfig.from_dict(flat) == config
    assert TrainConfig.flatten(config.to_sections()) == dataclasses.asdict(config)
    # An older run's flat config.json with the former names of the k-NN settings.
    old = {k: v for k, v in flat.items() if k not in ("nb_knn", "temperature")}
    loaded = TrainConfig.from_dict({**old, "knn_k": 5, "knn_temperature": 0.1})
    assert loaded == config
    # A former name inside its section is read too.
    assert TrainConfig.from_dict({"evaluation": {"knn_k": 7}}).nb_knn == 7


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"modle": {"arch": "vit_tiny"}},
            r"^unknown section 'modle' \(the sections of TrainConfig are model, crops, "
            r"optimisation, teacher, data, run, evaluation\)",
        ),
        ({"no_such_section": {}}, r"^unknown section 'no_such_section'"),
        ({"extras": 3}, r"^unknown section 'extras'"),
        ({"model": {"no_such_flag": 1}}, r"^--no_such_flag: unknown setting in section 'model'"),
        ({"model": {"lr": 0.1}}, r"^--lr: in section 'model', but belongs in 'optimisation'"),
        ({"depth": 3}, r"^--depth: outside its section 'model' in a grouped config"),
        ({"model": "vit_tiny"}, r"^section 'model': expected an object, got 'vit_tiny'"),
        ({"model": {"depth": 2.5}}, r"^--depth: expected an integer"),
    ],
)
def test_unknown_sections_and_misplaced_keys_are_refused_by_name(change, message):
    grouped = TrainConfig().to_sections()
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({**grouped, **change})


def test_the_run_config_json_is_grouped_and_guards_the_architecture(tmp_path):
    import dataclasses
    import json

    import tensorflow as tf

    from dino_keras.checkpointing import check_or_write_run_config

    config = TrainConfig.from_dict({**CHANGED, "output_dir": str(tmp_path)})
    check_or_write_run_config(config)  # no checkpoint yet: written
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert sorted(saved) == sorted(SECTION_NAMES)
    assert saved["model"]["arch"] == "vit_tiny" and saved["data"]["data_path"] == "tfds:cifar10"
    assert TrainConfig.from_dict(saved) == config
    # With a checkpoint in the run, another architecture is refused: read from the grouped
    # config.json and from an older run's flat one.
    tf.train.Checkpoint(step=tf.Variable(1)).save(str(tmp_path / "checkpoints" / "latest"))
    deeper = dataclasses.replace(config, depth=3)
    with pytest.raises(ConfigError, match=r"^--depth=3 differs from the checkpoints"):
        check_or_write_run_config(deeper)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dataclasses.asdict(config), f)
    with pytest.raises(ConfigError, match=r"^--depth=3 differs from the checkpoints"):
        check_or_write_run_config(deeper)
    check_or_write_run_config(dataclasses.replace(config, lr=0.01))  # not architecture
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["optimisation"]["lr"] == 0.01
