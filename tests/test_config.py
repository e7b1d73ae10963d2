"""The config step: every schema key's range, YAML errors, the run identity (which keys retrain), the
evaluation identity, credentials kept out of what is printed or stored, and the cost estimate."""

import dataclasses

import pytest
import yaml
from conftest import EXPERIMENTS, run_main
from omegaconf import OmegaConf

from orchestrator.config import (
    FREE_FORM,
    VALUE_RULES,
    check_values,
    compose_experiment,
    credentials,
    redact_uri,
    redacted,
    redacted_yaml,
    with_credentials,
    with_values,
)
from orchestrator.errors import ExperimentError
from orchestrator.plan import config_hash, evaluation_key
from orchestrator.records import flat_params
from orchestrator.run import main
from orchestrator.schema import ExperimentConfig

TABLE2 = str(EXPERIMENTS / "table2.yaml")


def schema_leaves(node=ExperimentConfig, prefix=""):
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else None) or (
                f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)):
            yield from schema_leaves(f.default_factory, f"{key}.")
        else:
            yield key


def test_every_schema_key_has_a_range_rule():
    leaves = set(schema_leaves())
    schema = OmegaConf.structured(ExperimentConfig)
    booleans = {k for k in leaves if isinstance(OmegaConf.select(schema, k), bool)}
    assert leaves - booleans - FREE_FORM == set(VALUE_RULES), "a key without a rule, or a rule without a key"


@pytest.fixture(scope="module")
def table2_test():
    return compose_experiment(TABLE2, ["scale=test"])


@pytest.mark.parametrize("key", sorted(VALUE_RULES))
def test_a_bad_value_of_every_key_is_named_with_its_range(key, table2_test):
    rule = VALUE_RULES[key]
    bad = table2_test.copy()
    OmegaConf.set_readonly(bad, False)
    OmegaConf.update(bad, key, rule.bad_example())
    with pytest.raises(ExperimentError) as e:
        check_values(bad, "table2.yaml")
    assert f"table2.yaml: {key}=" in str(e.value) and rule.describe() in str(e.value), str(e.value)


def test_a_bad_value_stops_the_dry_run_and_the_run_alike(tmp_path):
    for extra in (["--dry-run"], []):
        r = run_main(main, [TABLE2, "scale=test", "train.batch_size=-64", *extra], tmp_path)
        assert r.returncode == 2
        assert r.stderr.strip() == ("error: table2.yaml: train.batch_size=-64 is out of range: it must be an integer "
                                    ">= 1"), r.stderr
        assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("override,fragment", [
    ("train.batch_size=-64", "train.batch_size=-64 is out of range: it must be an integer >= 1"),
    ("train.steps=-5", "train.steps=-5"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0"),
    ("train.log_every=0", "train.log_every=0"),
    ("storage.keep_checkpoints=0", "storage.keep_checkpoints=0"),
    ("train.lr=-1", "train.lr=-1"),
    ("train.min_lr=0.1", "train.min_lr=0.1 is above train.lr=0.001"),
    ("train.betas=[0.9,1.5]", "train.betas=[0.9, 1.5]"),
    ("cluster.num_workers=3", "not divisible by cluster.num_workers=3"),
    ("train.grad_accum_steps=3", "the per-worker batch (16 = train.batch_size=32 / cluster.num_workers=2) is not "
                                 "divisible by train.grad_accum_steps=3"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps=0 is out of range: it must be an integer >= 1"),
    ("cluster.gpu_memory_gb=81920", "cluster.gpu_memory_gb=81920.0 is out of range: it must be null or a number in "
                                    "[1, 1024]"),  # MiB where GiB are meant
])
def test_the_values_operators_tripped_on_are_refused(override, fragment):
    with pytest.raises(ExperimentError) as e:
        cfg(override)
    assert fragment in str(e.value)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    exp = tmp_path / "broken.yaml"
    exp.write_text("defaults:\n  - base\n  - _self_\ntrain:\n  lr: [0.1\n  steps: 3\n")
    r = run_main(main, [exp], tmp_path)
    assert r.returncode == 2
    assert f"{exp}: line " in r.stderr and "column" in r.stderr and "YAML syntax error" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_directory_is_not_an_experiment(tmp_path):
    with pytest.raises(ExperimentError, match="is a directory"):
        compose_experiment(EXPERIMENTS, [])


BASE = {}


def cfg(*overrides):
    """table2 at test scale with key=value overrides (composed once; overrides merged as a sweep's are)."""
    if not BASE:
        BASE["cfg"] = compose_experiment(TABLE2, ["scale=test"])
    values = dict(o.split("=", 1) for o in overrides)
    return with_values(BASE["cfg"], {k: yaml.safe_load(v) for k, v in values.items()})


@pytest.mark.parametrize("override", [
    "model.arch=4-128-2-2", "model.nvp=false", "train.lr=0.002", "train.noise=gaussian", "train.seed=1",
    "train.batch_size=64", "data.limit=256", "train.steps=31", "experiment.name=other", "model.layers_per_block=1",
])
def test_what_changes_the_trained_model_changes_the_run(override):
    assert config_hash(cfg(override)) != config_hash(cfg())


@pytest.mark.parametrize("override", [
    "eval.guidance=2.0", "eval.fid.enabled=true", "data.val_limit=64", "storage.uri=elsewhere",
    "tracking.uri=http://h:5000", "cluster.num_workers=1", "cluster.max_failures=0", "train.log_every=5",
    "train.checkpoint_every=5", "data.num_workers=2", "storage.keep_checkpoints=5",
    "train.label_drop=0.1",  # explicitly the default: the same model
    "train.grad_accum_steps=2", "train.activation_checkpointing=true",  # memory knobs: the same model
    "cluster.gpu_memory_gb=39.4", "cluster.check_memory=false",
])
def test_where_and_how_it_runs_or_is_evaluated_keeps_the_run(override):
    assert config_hash(cfg(override)) == config_hash(cfg())


def test_evaluation_identity_follows_the_eval_section_only():
    assert evaluation_key(cfg("eval.guidance=2.0")) != evaluation_key(cfg())
    assert evaluation_key(cfg("data.val_limit=64")) != evaluation_key(cfg())
    assert evaluation_key(cfg("train.lr=0.002")) == evaluation_key(cfg())
    assert evaluation_key(cfg("eval.guidance=0.0")) == evaluation_key(cfg())  # the default, said explicitly


def test_credentials_in_uris_are_redacted_wherever_the_config_goes(tmp_path):
    assert redact_uri("http://user:pa55@mlflow:5000/x") == "http://user:***@mlflow:5000/x"
    assert redact_uri("https://token@host") == "https://***@host"
    assert redact_uri("http://host:5000") == "http://host:5000" and redact_uri(None) is None
    c = compose_experiment(TABLE2, ["scale=test", "tracking.uri=http://alice:s3cret@127.0.0.1:9",
                                    "storage.endpoint_url=http://k:s3cret@127.0.0.1:9",
                                    "cluster.address=ray://x:s3cret@head:10001"])
    assert "s3cret" not in redacted_yaml(c) and "alice:***@" in redacted_yaml(c)
    assert not [v for v in flat_params(c).values() if "s3cret" in v]
    r = run_main(main, [TABLE2, "scale=test", "tracking.uri=http://alice:s3cret@127.0.0.1:9", "--dry-run"], tmp_path)
    assert r.returncode == 0 and "s3cret" not in r.stdout and "alice:***@127.0.0.1:9" in r.stdout
    # what a sweep stores in Tune's state is the redacted config; its trials get the credentials back apart
    secrets = credentials(c)
    assert sorted(secrets) == ["cluster.address", "storage.endpoint_url", "tracking.uri"]
    assert "s3cret" not in str(redacted(c))
    assert with_credentials(redacted(c), secrets) == OmegaConf.to_container(c, resolve=True)


@pytest.mark.parametrize("override", ["eval.every_steps=100", "eval.periodic_val_images=64", "eval.periodic_samples=4",
                                      "eval.periodic_fid_samples=32", "tracking.system_metrics_interval=null"])
def test_what_is_watched_during_training_changes_neither_the_run_nor_its_evaluation(override):
    assert config_hash(cfg(override)) == config_hash(cfg())
    assert evaluation_key(cfg(override)) == evaluation_key(cfg())  # a finished run is not evaluated again


def test_a_periodic_fid_of_one_sample_is_refused():
    with pytest.raises(ExperimentError, match="eval.periodic_fid_samples=1 is out of range"):
        cfg("eval.periodic_fid_samples=1")


@pytest.mark.parametrize("gpus", ["0.5", "1.5"])
def test_a_fraction_of_a_gpu_per_worker_is_refused_before_any_work(tmp_path, gpus):
    """Two NCCL ranks on one GPU fail at the first collective, after the cluster has started."""
    r = run_main(main, [TABLE2, "cluster=a100_80gb", f"cluster.gpus_per_worker={gpus}", "--dry-run"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cluster.gpus_per_worker={gpus}" in r.stderr and "whole GPU" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_data_smaller_than_one_global_batch_is_refused_before_any_work(tmp_path):
    """With whole batches only, such a run would train forever without a step (it used to, silently)."""
    for args in ([TABLE2, "scale=smoke", "data.limit=50", "train.batch_size=64", "--dry-run"],
                 [TABLE2, "scale=test", "data.limit=50", "train.batch_size=64"]):
        r = run_main(main, args, tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "50 training images" in r.stderr and "train.batch_size=64" in r.stderr, r.stderr
        assert list(tmp_path.iterdir()) == []
