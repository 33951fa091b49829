from pathlib import Path

import pytest

from medusa_ray.config import ConfigError, build_config, load_config


def test_defaults_validate_and_train_data_follows_distill_output():
    cfg = build_config({}, ["distill.output_dir=/data/distilled"])
    assert cfg.train_data == "/data/distilled"
    cfg = build_config({}, ["distill.output_dir=/a", "train.data=/b"])
    assert cfg.train_data == "/b"


def test_overrides_are_typed_like_yaml(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("model: my/model\ntrain:\n  num_workers: 1\n  lr: 0.01\n")
    cfg = load_config(path, ["train.num_workers=2", "train.share_lm_head=true", "train.tracking=[wandb, mlflow]",
                             "distill.engine_kwargs={max_model_len: 512}", "ray.address=auto"])
    assert cfg.model == "my/model"
    assert cfg.train.num_workers == 2 and cfg.train.lr == 0.01 and cfg.train.share_lm_head is True
    assert cfg.train.tracking == ["wandb", "mlflow"]
    assert cfg.distill.engine_kwargs == {"max_model_len": 512}
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.medusa_num_heads=0", "train.medusa_num_heads"),
        ("distill.nonsense=1", "distill.nonsense"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.lr=fast", "train.lr"),
        ("nosection.key=1", "nosection"),
        ("distill.format=csv", "distill.format"),
        ("train.tracking=[tensorboard, neptune]", "train.tracking.1"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        build_config({}, [override])
    message = str(err.value)
    assert "\n" not in message
    assert key in message


def test_cross_field_rule_and_malformed_override():
    with pytest.raises(ConfigError, match="min_replicas"):
        build_config({}, ["distill.min_replicas=3", "distill.max_replicas=2"])
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config({}, ["train.lr"])


def test_config_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_docs_config_reference_is_current():
    from medusa_ray.config import reference_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    section = page.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert section.strip() == reference_markdown().strip(), "run: python scripts/sync_readme.py"
