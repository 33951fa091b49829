"""Tracking: what lands in TensorBoard, W&B (offline) and MLflow, read back with each library's own reader."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_distilled

from medusa_ray import faults
from medusa_ray.config import build_config

# Before the session's Ray cluster starts, so train workers inherit it: no test ever talks to W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Reading the default file store needs MLflow 3's opt-in in the test process too.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

ALL = "train.tracking=[tensorboard,wandb,mlflow]"
HEADS = 2


# ---------------------------------------------------------------- readers (each library's own)

def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_hparams(log_dir: Path) -> dict:
    """The run's hyper-parameters as TensorBoard's HParams dashboard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    return dict(metadata.parse_session_start_info_plugin_data(content).hparams)


def wandb_fragments(run_dir: Path) -> list[dict]:
    """Every offline run directory under ``run_dir/wandb``, parsed by ``wandb leet inspect --json``."""
    fragments = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):  # names start with the start time
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(d)],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        run = next(r["run"] for r in records if r["type"] == "run")
        config: dict = {}
        summary: dict = {}
        for r in records:
            if r["type"] == "config":
                config.update(r["config"].get("update", {}))
            if r["type"] == "summary":
                summary.update(r["summary"].get("update", {}))
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        fragments.append({"run_id": run["run_id"], "config": config, "summary": summary, "history": history})
    return fragments


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"]


def our_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "medusa_ray.tracking" and r.levelno >= logging.WARNING]


def steps_of(history, key: str) -> list[int]:
    return [int(item["train/step"]) for item in history if key in item]


# ---------------------------------------------------------------- the tracker itself

def _metrics(step: int, attempt: int) -> dict[str, float]:
    m = {"loss": 10.0 * attempt + 1.0 / step, "lr": 1e-3, "tokens_per_s": 100.0 + step}
    for k in range(HEADS):
        m[f"medusa{k}_loss"] = 10.0 * attempt + (k + 1.0) / step
        m[f"medusa{k}_top1"] = 0.1 * step
    return m


def test_all_three_trackers_log_and_a_resumed_run_appends(tmp_path, caplog):
    from medusa_ray.tracking import open_tracker

    run_dir = tmp_path / "medusa"
    cfg = build_config({}, [ALL, f"train.medusa_num_heads={HEADS}", "train.run_name=medusa"])

    # First attempt: steps 1..4; its last checkpoint was at step 2.
    tracker = open_tracker(cfg, run_dir)
    assert tracker.backends == ["tensorboard", "wandb", "mlflow"]
    tracker.log_summary({"rows_out": 32, "failed": 1, "tokens_per_s": 55.5, "output_dir": "/x"}, prefix="distill/")
    for step in range(1, 5):
        tracker.log_metrics(_metrics(step, attempt=1), step=step)
    tracker.close()
    state = json.loads((run_dir / "tracking.json").read_text())

    # Resume from the step-2 checkpoint with a changed config: steps 3..6 again, then the final summary.
    resumed_cfg = build_config({}, [ALL, f"train.medusa_num_heads={HEADS}", "train.run_name=medusa",
                                    "train.max_steps=6"])
    with caplog.at_level(logging.WARNING, logger="medusa_ray.tracking"):
        with open_tracker(resumed_cfg, run_dir) as tracker:
            for step in range(3, 7):
                tracker.log_metrics(_metrics(step, attempt=2), step=step)
            tracker.log_summary({"medusa0_top1": 0.6, "medusa1_top1": 0.4})
    assert json.loads((run_dir / "tracking.json").read_text()) == state, "resume must reuse the same runs"
    assert [m for m in our_warnings(caplog) if "immutable" in m and "train.max_steps" in m]

    # TensorBoard: one directory; the crashed attempt's steps 3-4 are purged, the resumed values win.
    tb = tb_scalars(Path(state["tensorboard"]["log_dir"]))
    for k in range(HEADS):
        curve = tb[f"train/medusa{k}_loss"]
        assert [s for s, _ in curve] == [1, 2, 3, 4, 5, 6]
        assert curve[2][1] == pytest.approx(_metrics(3, attempt=2)[f"medusa{k}_loss"])
        assert curve[0][1] == pytest.approx(_metrics(1, attempt=1)[f"medusa{k}_loss"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/medusa1_top1"} <= set(tb)
    assert tb["distill/rows_out"] == [(0, 32.0)]
    assert tb["summary/medusa1_top1"] == [(6, pytest.approx(0.4))]
    hparams = tb_hparams(Path(state["tensorboard"]["log_dir"]))
    assert hparams["train.lr"].number_value == cfg.train.lr
    assert hparams["model"].string_value == cfg.model

    # W&B: two offline fragments of one run id, which `wandb sync` uploads as one run.
    fragments = wandb_fragments(run_dir)
    assert [f["run_id"] for f in fragments] == [state["wandb"]["id"]] * 2
    history = [item for f in fragments for item in f["history"]]
    for k in range(HEADS):
        assert steps_of(history, f"train/medusa{k}_loss") == [1, 2, 3, 4, 3, 4, 5, 6]
    assert fragments[0]["config"]["train"]["lr"] == cfg.train.lr
    assert fragments[1]["config"]["train"]["max_steps"] == 6
    assert fragments[0]["summary"]["distill/rows_out"] == 32
    assert fragments[1]["summary"]["summary/medusa0_top1"] == pytest.approx(0.6)

    # MLflow: the same run, every step, params written once.
    client, run_id = mlflow_client(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for k in range(HEADS):
        history = client.get_metric_history(run_id, f"train/medusa{k}_loss")
        assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["train.max_steps"] == "None"  # first value kept
    assert run.data.params["train.tracking"] == str(cfg.train.tracking)
    assert run.data.metrics["distill/rows_out"] == 32
    assert run.data.tags["distill/output_dir"] == "/x"
    assert run.data.metrics["summary/medusa0_top1"] == pytest.approx(0.6)


@pytest.fixture
def fresh_wandb():
    """wandb reads its environment once per process: set it up anew for this test, and after it."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def test_unreachable_wandb_warns_once_and_logs_offline(tmp_path, monkeypatch, caplog, fresh_wandb):
    import medusa_ray.tracking as tracking

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr(tracking, "WANDB_INIT_TIMEOUT_S", 3.0)
    cfg = build_config({}, ["train.tracking=[wandb]"])
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="medusa_ray.tracking"):
        tracker = tracking.open_tracker(cfg, run_dir)
        for step in (1, 2):
            tracker.log_metrics({"loss": 1.0 / step, "medusa0_loss": 2.0 / step}, step=step)
        tracker.close()
    warnings = our_warnings(caplog)
    assert len(warnings) == 1 and "W&B unavailable" in warnings[0] and "wandb sync" in warnings[0]
    (fragment,) = wandb_fragments(run_dir)
    assert steps_of(fragment["history"], "train/medusa0_loss") == [1, 2]
    assert fragment["run_id"] == json.loads((run_dir / "tracking.json").read_text())["wandb"]["id"]


def test_a_backend_that_cannot_start_is_skipped(tmp_path, caplog):
    from medusa_ray.tracking import open_tracker

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("in the way")  # SummaryWriter cannot create its directory
    cfg = build_config({}, ["train.tracking=[tensorboard,mlflow]"])
    with caplog.at_level(logging.WARNING, logger="medusa_ray.tracking"):
        tracker = open_tracker(cfg, run_dir)
    assert tracker.backends == ["mlflow"]
    assert [m for m in our_warnings(caplog) if "tensorboard disabled" in m]
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    client, run_id = mlflow_client(run_dir)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]
    assert "tensorboard" not in json.loads((run_dir / "tracking.json").read_text())


def test_a_backend_failing_mid_run_warns_once_and_never_raises(tmp_path, caplog):
    from medusa_ray.tracking import open_tracker

    run_dir = tmp_path / "run"
    cfg = build_config({}, ["train.tracking=[tensorboard,mlflow]"])
    tracker = open_tracker(cfg, run_dir)
    tracker.log_metrics({"loss": 1.0}, step=1)
    client, run_id = mlflow_client(run_dir)
    client.delete_run(run_id)  # from now on MLflow refuses every write to this run
    with caplog.at_level(logging.WARNING, logger="medusa_ray.tracking"):
        for step in range(2, 7):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.log_summary({"medusa0_top1": 0.5})
        tracker.close()
    messages = our_warnings(caplog)
    assert sum("mlflow.log_metrics failed" in m for m in messages) == 1
    assert sum("mlflow disabled after" in m for m in messages) == 1
    assert len(messages) == 2
    assert tracker.backends == ["tensorboard"]
    tb = tb_scalars(run_dir / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5, 6]

    # Resuming after the MLflow run was deleted starts a new MLflow run; TensorBoard continues its own.
    with open_tracker(cfg, run_dir) as tracker:
        tracker.log_metrics({"loss": 0.1}, step=7)
    client, new_run_id = mlflow_client(run_dir)
    assert new_run_id != run_id
    assert [m.step for m in client.get_metric_history(new_run_id, "train/loss")] == [7]
    assert [s for s, _ in tb_scalars(run_dir / "tensorboard")["train/loss"]] == [1, 2, 3, 4, 5, 6, 7]


def test_metric_keys_and_params_are_normalised(tmp_path):
    from medusa_ray.tracking import open_tracker

    run_dir = tmp_path / "run"
    cfg = build_config({}, ["train.tracking=[mlflow]"])
    with open_tracker(cfg, run_dir) as tracker:
        tracker.log_params({"world_size": 2, "data": {"rows": 32, "source": "/d"}})
        tracker.log_metrics({"loss": 2.5, "train/already": 1.0, "note": "text is skipped", "flag": True}, step=3)
    client, run_id = mlflow_client(run_dir)
    run = client.get_run(run_id)
    assert set(run.data.metrics) == {"train/loss", "train/already", "train/step"}
    assert run.data.metrics["train/step"] == 3
    assert run.data.params["world_size"] == "2" and run.data.params["data.rows"] == "32"
    assert run.data.params["model"] == cfg.model


# ---------------------------------------------------------------- through train

@pytest.mark.slow
def test_train_logs_every_head_to_all_three_and_a_resumed_run_appends(tmp_path, random_tiny_model, ray_session,
                                                                        monkeypatch):
    """One train run that crashes at step 3 and resumes from its step-2 checkpoint: a single tracked run."""
    from medusa_ray import train

    data = tmp_path / "distill"
    write_distilled(data, n=48, model=str(random_tiny_model), ids="sha256", errors=False)
    storage = tmp_path / "ray_results"
    monkeypatch.setenv(*faults.env(train_fail_at_step=3).popitem())
    result = train.run(build_config({}, [
        ALL, f"model={random_tiny_model}", f"train.data={data}", f"train.storage_path={storage}",
        "train.run_name=tracked", f"train.medusa_num_heads={HEADS}", "train.batch_size=4", "train.max_length=64",
        "train.zero_stage=0", "train.warmup_steps=0", "train.use_gpu=false", "train.max_steps=4",
        "train.checkpoint_every=2", "train.max_failures=1"]))
    assert result.global_step == 4 and result.resumed_from == 2
    run_dir = storage / "tracked"
    state = json.loads((run_dir / "tracking.json").read_text())

    expected = [1, 2, 3, 4]
    tb = tb_scalars(Path(state["tensorboard"]["log_dir"]))
    fragments = wandb_fragments(run_dir)
    assert [f["run_id"] for f in fragments] == [state["wandb"]["id"]] * 2  # one per attempt, one run
    history = [item for f in fragments for item in f["history"]]
    client, run_id = mlflow_client(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for k in range(HEADS):
        key = f"train/medusa{k}_loss"
        assert [s for s, _ in tb[key]] == expected, key
        assert steps_of(history, key) == expected, key
        mlflow_history = client.get_metric_history(run_id, key)
        assert [m.step for m in mlflow_history] == expected, key
        tb_values = [v for _, v in tb[key]]
        assert [m.value for m in mlflow_history] == pytest.approx(tb_values, rel=1e-5)
        assert [item[key] for item in history if key in item] == pytest.approx(tb_values, rel=1e-5)
        assert all(v > 0 for v in tb_values)
    for key in ("train/loss", "train/lr", "train/tokens_per_s", "train/medusa0_top1"):
        assert [s for s, _ in tb[key]] == expected, key
    # The final per-head summary, from the attempt that finished.
    assert fragments[-1]["summary"]["summary/medusa1_loss"] == pytest.approx(result.metrics["medusa1_loss"])
    assert run.data.metrics["summary/medusa1_loss"] == pytest.approx(result.metrics["medusa1_loss"])
    assert run.data.params["train.max_steps"] == "4"
