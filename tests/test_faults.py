"""Fault injection is a test-only environment hook, never a key of the user's config."""

import pytest

from medusa_ray import faults
from medusa_ray.config import ConfigError, build_config


@pytest.mark.parametrize("key", ["distill.fail_at=first_reply", "train.fail_at_step=3", "train.record_rows_dir=/x"])
def test_test_hooks_are_not_config_keys(key):
    with pytest.raises(ConfigError, match="unknown key"):
        build_config({}, [key])


def test_faults_come_from_the_environment_and_are_checked(monkeypatch):
    assert faults.active() == {}
    monkeypatch.setenv(*faults.env(train_fail_at_step=3, distill_kill_at="shard_write").popitem())
    assert faults.get("train_fail_at_step") == 3 and faults.get("distill_kill_at") == "shard_write"
    monkeypatch.setenv(faults.ENV, '{"train_fail_at_stpe": 3}')
    with pytest.raises(ValueError, match="unknown fault"):
        faults.active()
    monkeypatch.setenv(faults.ENV, '{"distill_kill_at": "never"}')
    with pytest.raises(ValueError, match="not valid"):
        faults.active()
