"""The typed config schemas (ntklab.experiments.schema) and the entry scripts' error lines (cli)."""

from __future__ import annotations

import dataclasses
import errno

import pytest
from conftest import compose_config
from hydra.errors import HydraException
from omegaconf import OmegaConf

from ntklab.artifacts import RunFolderInUse
from ntklab.experiments import training
from ntklab.experiments.cli import USAGE_ERROR, user_error_message
from ntklab.experiments.schema import SCRIPT_SCHEMAS, model_schema
from ntklab.experiments.validation import (
    ConfigError,
    check_command_line,
    check_model,
    train_config,
    validate,
)
from ntklab.models import build_model, model_class, model_names
from ntklab.train import TrainConfig

SCRIPTS = sorted(SCRIPT_SCHEMAS)


def compose(script: str, *overrides: str):
    return compose_config(f"{script}", ["paths.run_dir=/nonexistent/run", *overrides])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_config_composes_typed_and_complete(script):
    cfg = compose(script)
    validate(cfg)
    assert OmegaConf.get_type(cfg) is SCRIPT_SCHEMAS[script]
    check_model(cfg.model)  # the model node is checked against the module's fields
    assert OmegaConf.missing_keys(cfg) == set()  # the YAML sets every key the schema declares
    if "train" in cfg:  # one definition: the trainer's own config is the schema node
        assert OmegaConf.get_type(cfg.train) is TrainConfig
        assert train_config(cfg) == TrainConfig(**OmegaConf.to_container(cfg.train))
    assert cfg.overwrite is False


@pytest.mark.parametrize("name", model_names())
def test_model_schemas_are_the_model_constructor_fields(name):
    fields = {f.name: f for f in dataclasses.fields(model_schema(model_class(name)))}
    model = build_model(name)
    expected = {f.name for f in dataclasses.fields(model)} - {"parent"}
    assert set(fields) == expected | {"_target_"}
    cfg = compose("compute_ntk", f"model={name}")
    assert build_model(**cfg.model) == model  # YAML defaults equal the constructor's


def test_alignment_defaults_to_every_eigenvector():
    assert compose("train_ntk").alignment.num_eigvecs is None


def test_lr_normalization_and_bn_statistics_defaults_are_the_studys():
    assert compose("train_ntk").train.lr_normalization == "none"
    assert compose("pretrained_ntk_comparison").train.lr_normalization == "none"
    assert compose("train_ntk").bn_statistics == "trained"  # K_T with the trained statistics
    assert compose("pretrained_ntk_comparison").bn_statistics == "initial"  # (c) reset to θ0's


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("train_ntk", "train.epochs=0", "train.epochs=0 is invalid: must be an integer >= 1"),
        ("train_ntk", "label_idx=-1", "label_idx=-1 is invalid: must be an integer >= 0"),
        (
            "train_ntk",
            "alignment.num_eigvecs=0",
            "alignment.num_eigvecs=0 is invalid: must be null",
        ),
        (
            "train_ntk",
            "train.optimizer=rmsprop",
            "train.optimizer='rmsprop' is invalid: must be one",
        ),
        (
            "train_ntk",
            "train.checkpoint_every=0",
            "train.checkpoint_every=0 is invalid: must be null",
        ),
        (
            "train_ntk",
            "train.lr_normalization=foo",
            "train.lr_normalization='foo' is invalid: must be one of: none, ntk",
        ),
        (
            "pretrained_ntk_comparison",
            "train.lr_normalization=foo",
            "train.lr_normalization='foo' is invalid: must be one of: none, ntk",
        ),
        (
            "train_ntk",
            "bn_statistics=x",
            "bn_statistics='x' is invalid: must be one of: initial, tr",
        ),
        (
            "pretrained_ntk_comparison",
            "bn_statistics=x",
            "bn_statistics='x' is invalid: must be one of: initial, trained",
        ),
        ("train_nads", "data.sigma=-1", "data.sigma=-1.0 is invalid: must be a finite number >= 0"),
        (
            "train_cifar",
            "data.num_train=0",
            "data.num_train=0 is invalid: must be null or an integ",
        ),
        (
            "compute_ntk",
            "ntk.num_eigvecs=0",
            "ntk.num_eigvecs=0 is invalid: must be an integer >= 1",
        ),
        (
            "compute_ntk",
            "ntk.solver=eigh",
            "ntk.solver='eigh' is invalid: must be one of: auto, de",
        ),
        (
            "compute_ntk",
            "ntk.out_of_core=maybe",
            "ntk.out_of_core='maybe' is invalid: must be one of",
        ),
        (
            "compute_ntk",
            "ntk.out_of_core=1",
            "ntk.out_of_core=1 is invalid: must be one of: true, fa",
        ),
        ("compute_ntk", "ntk.implementation=fast", "ntk.implementation='fast' is invalid: must be"),
        ("compute_ntk", "data.dataset=imagenet", "data.dataset='imagenet' is invalid: must be one"),
        (
            "compute_ntk",
            "model.activation=swish",
            "model.activation='swish' is invalid: must be one",
        ),
        (
            "compute_nads",
            "nads.dtype=float16",
            "nads.dtype='float16' is invalid: must be one of: fl",
        ),
        (
            "compute_nads",
            "nads.shape=[32,32]",
            "nads.shape=[32, 32] is invalid: must be a list [H, W",
        ),
        (
            "compute_ntk",
            "+ntk.num_eigvec=10",
            "unknown key ntk.num_eigvec; valid keys of ntk: batch_",
        ),
        (
            "train_ntk",
            "+foo=1",
            "unknown key foo; valid keys of the top level: seed, order_seed, overwrite, pr",
        ),
        (
            "compute_ntk",
            "+model.depth=3",
            "unknown key model.depth; valid keys of model: name, num_o",
        ),
        ("compute_ntk", "model=mlp", None),
        ("compute_ntk", "model=mlp model.widths=[0]", "model: widths=[0] is invalid: every width"),
        ("train_ntk", "train.momentum=2", "train.momentum=2.0 is invalid: must be a number in"),
        ("train_ntk", "train.max_lr=0", "train.max_lr=0.0 is invalid: must be a finite number > 0"),
        ("train_ntk", "order_seed=-1", "order_seed=-1 is invalid: must be null or an integer >= 0"),
        ("train_cifar", "model.num_outputs=0", "model: num_outputs must be a positive integer"),
        (
            "train_ntk",
            "alignment.every=0",
            "alignment.every=0 is invalid: must be null or an integer >= 1",
        ),
    ],
)
def test_ranges_choices_and_added_keys_are_refused_in_one_line(script, override, message):
    if message is None:  # the zoo's other models: a valid override stays valid
        validate(compose(script, *override.split()))
        return
    cfg = compose(script, *override.split())
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert str(error.value).startswith(message)
    assert user_error_message(error.value) == (str(error.value), USAGE_ERROR)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("train_ntk", "linearize=maybe", "linearize=maybe: Value 'maybe' is not a valid bool"),
        ("train_ntk", "train.epochs=ten", "train.epochs=ten: Value 'ten' of type 'str' could not"),
        (
            "compute_ntk",
            "ntk.num_eigvec=10",
            "unknown key ntk.num_eigvec; valid keys of ntk: batch",
        ),
        (
            "compute_ntk",
            "model.widths=[3]",
            "unknown key model.widths; valid keys of model: name, num_outputs, activation",
        ),
        ("compute_ntk", "model=vgg", "In 'compute_ntk': Could not find 'model/vgg'; Availa"),
        (
            "train_cifar",
            "train.lr_normalize=ntk",
            "unknown key train.lr_normalize; valid keys of train",
        ),
    ],
)
def test_wrong_types_and_unknown_keys_are_refused_by_hydra(script, override, message):
    with pytest.raises(HydraException) as error:
        compose(script, override)
    text, code = user_error_message(error.value)
    assert text.startswith(message) and code == USAGE_ERROR
    assert "\n" not in text


def test_unknown_group_option_lists_the_options_without_schemas():
    with pytest.raises(HydraException) as error:
        compose("compute_ntk", "model=vgg")
    text, _ = user_error_message(error.value)
    assert text.endswith("lenet, mlp, resnet18") and "_schema" not in text


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ("with_bias=no", True),
        ("linearize=0", True),
        ("progress=off", True),
        ("with_bias=false", False),
        ("linearize=true", False),
        ("paths.run_dir=no", False),  # a string key: "no" is a folder name
        ("train.epochs=3", False),
    ],
)
def test_command_line_booleans_must_be_true_or_false(override, refused):
    cfg = compose("train_ntk", override)
    if refused:
        with pytest.raises(ConfigError, match=r"is invalid: must be true or false"):
            check_command_line(cfg, [override])
    else:
        check_command_line(cfg, [override])


def test_user_errors_and_bugs_are_told_apart():
    disk_full = OSError(errno.ENOSPC, "No space left on device", "/data/run/eigvecs.npy")
    assert user_error_message(disk_full) == (
        "No space left on device: /data/run/eigvecs.npy",
        1,
    )
    assert user_error_message(RunFolderInUse("run folder x in use by PID 7")) == (
        "run folder x in use by PID 7",
        1,
    )
    assert user_error_message(FileExistsError("x holds a run"))[1] == 1
    assert user_error_message(ValueError("non-finite kernel"))[1] == 1
    assert user_error_message(RuntimeError("a bug")) == (None, 1)  # shown with its traceback


def test_training_identity_leaves_out_keys_that_do_not_change_results():
    base = training.run_identity(compose("train_ntk"))
    for override in ("train.checkpoint_every=3", "progress=false", "alignment.batch_size=7"):
        assert training.run_identity(compose("train_ntk", override)) == base
    assert training.run_identity(compose("train_ntk", "label_idx=3")) != base
    assert "paths" not in base and "overwrite" not in base
