"""`train` end to end on Ray Train: 2 workers, real DeepSpeed over gloo, distilled Parquet, tiny model."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_distilled

from medusa_ray import faults
from medusa_ray.config import build_config
from medusa_ray.errors import UserError
from medusa_ray.tiny import corpus
from medusa_ray import checkpoint as checkpoints
from medusa_ray.train import find_latest_checkpoint, run
from medusa_ray.train.plots import read_metrics

NUM_HEADS = 3


def register_checkpoints(run_dir: Path, names: list[str]) -> None:
    """Write Ray Train's record of a run's checkpoints, in Ray's own schema (what ``Result.from_path`` reads)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={}) for n in names]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(names), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    (run_dir / "checkpoint_manager_snapshot.json").write_text(state.model_dump_json())


def _cfg(model, data, storage, run_name, *overrides):
    return build_config({}, [
        f"model={model}", f"train.data={data}", f"train.storage_path={storage}", f"train.run_name={run_name}",
        f"train.medusa_num_heads={NUM_HEADS}", "train.num_workers=2", "train.batch_size=4", "train.lr=3e-3",
        "train.warmup_steps=2", "train.max_length=128", "train.logits_chunk_tokens=128", "train.tracking=[]",
        *overrides,
    ])


@pytest.mark.slow
def test_fault_mid_run_resumes_from_checkpoint_and_heads_learn(ray_session, random_tiny_model, distilled, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv(*faults.env(train_fail_at_step=8).popitem())
    cfg = _cfg(random_tiny_model, distilled, tmp_path, "fault", "train.zero_stage=2", "train.max_steps=20",
               "train.checkpoint_every=5", "train.val_every=5", "train.keep_checkpoints=2", "train.max_failures=1")
    result = run(cfg)

    # Rank 0 raised at step 8; Ray Train restarted the workers from the step-5 checkpoint and finished.
    assert (tmp_path / "fault" / ".fail_at_step_8.done").exists()
    assert result.resumed_from == 5
    assert result.global_step == 20
    assert result.checkpoint == find_latest_checkpoint(str(tmp_path), "fault")
    # Ray Train keeps the 2 best checkpoints by validation expected acceptance, and always the latest.
    kept = sorted(p.name for p in (tmp_path / "fault").glob("checkpoint_step*"))
    assert checkpoints.checkpoint_dir_name(20) in kept and 2 <= len(kept) <= 3
    scores = {c.step: c.score for c in checkpoints.run_checkpoints(str(tmp_path), "fault")}
    assert result.best_checkpoint.endswith(checkpoints.checkpoint_dir_name(max(scores, key=scores.get)))
    # 239 unique rows: 5% is 12, raised to val_min_rows (20); their short replies hold fewer than val_min_tokens, so
    # validation takes all it can spare, a tenth of the rows.
    assert result.validation["step"] == 20 and result.validation["rows"] == 23
    assert [json.loads(line)["step"] for line in (tmp_path / "fault" / "validation.jsonl").read_text().splitlines()
            ] == [5, 10, 15, 20]

    meta = checkpoints.read_meta(result.checkpoint).flat()
    assert meta["global_step"] == 20 and meta["world_size"] == 2 and meta["zero_stage"] == 2
    assert meta["medusa_num_heads"] == NUM_HEADS and meta["share_lm_head"] is False
    assert meta["config"]["train"]["run_name"] == "fault"
    # 20 steps x 2 workers x 4 rows, counted across the restart (the lost steps 6-7 are not double counted).
    assert meta["data"]["rows"] == 20 * 2 * 4 and meta["data"]["tokens"] > 0
    ds_dir = Path(result.checkpoint) / "deepspeed"
    assert (ds_dir / "latest").read_text().strip() == "global_step20"
    assert {p.name for p in (ds_dir / "global_step20").iterdir()} >= {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}

    # Every head reports loss and top-k accuracy, and every head's loss went down.
    history = read_metrics(tmp_path / "fault" / "metrics.jsonl")
    assert [r["step"] for r in history] == list(range(1, 21))
    first, last = history[0], history[-1]
    for k in range(NUM_HEADS):
        for key in (f"medusa{k}_loss", f"medusa{k}_top1", f"medusa{k}_top3"):
            assert key in last
        assert last[f"medusa{k}_loss"] < 0.8 * first[f"medusa{k}_loss"], (k, first, last)
    assert last["tokens_per_s"] > 0 and last["lr"] > 0
    assert result.metrics["step"] == 20
    assert result.plot is not None and Path(result.plot).stat().st_size > 0


@pytest.mark.slow
def test_stopped_run_continues_when_rerun_zero3(ray_session, random_tiny_model, distilled, tmp_path, monkeypatch):
    # The base sharded across the workers and its features cached: the road a base too big for one worker takes.
    args = (random_tiny_model, distilled, tmp_path, "rerun", "train.zero_stage=3", "train.max_steps=8",
            "train.checkpoint_every=3", "train.shard_base=true", "train.feature_cache=true")
    # The first attempt dies at step 5 with no retries left: the run stops after its step-3 checkpoint.
    monkeypatch.setenv(*faults.env(train_fail_at_step=5).popitem())
    with pytest.raises(Exception, match="injected failure"):
        run(_cfg(*args, "train.max_failures=0"))
    monkeypatch.delenv(faults.ENV)
    stopped = find_latest_checkpoint(str(tmp_path), "rerun")
    assert checkpoints.read_meta(stopped).global_step == 3

    # Re-running the same command continues from step 3 instead of starting over.
    result = run(_cfg(*args))
    assert result.resumed_from == 3 and result.global_step == 8
    meta = checkpoints.read_meta(result.checkpoint).flat()
    assert meta["zero_stage"] == 3 and meta["data"]["rows"] == 8 * 2 * 4
    # ZeRO-3 partitions the heads themselves: each rank wrote its own parameter shard.
    files = {p.name for p in (Path(result.checkpoint) / "deepspeed" / "global_step8").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files


def test_incompatible_rerun_and_bad_inputs_fail_before_ray(random_tiny_model, distilled, tmp_path):
    run_dir = tmp_path / "old" / "checkpoint_step00000004"
    (run_dir / "deepspeed").mkdir(parents=True)
    (run_dir / "deepspeed" / "latest").write_text("global_step4")
    meta = {"format": checkpoints.FORMAT, "global_step": 4, "medusa_num_heads": 5, "medusa_num_layers": 1,
            "share_lm_head": False, "hidden_size": 128, "vocab_size": 1024, "zero_stage": 2, "world_size": 2}
    (run_dir / checkpoints.META_FILE).write_text(json.dumps(meta))
    # Registered with Ray Train, as a real run's checkpoint is (an unregistered one is never resumed).
    register_checkpoints(run_dir.parent, [run_dir.name])
    with pytest.raises(UserError, match="medusa_num_heads=5"):
        run(_cfg(random_tiny_model, distilled, tmp_path, "old"))
    # A checkpoint from before train.method existed is a Medusa one: an EAGLE-3 config does not resume it.
    with pytest.raises(UserError, match="method='medusa' but this config gives 'eagle3'"):
        run(_cfg(random_tiny_model, distilled, tmp_path, "old", "train.method=eagle3"))
    with pytest.raises(UserError, match="no \\*.parquet"):
        run(_cfg(random_tiny_model, tmp_path, tmp_path, "x"))
    with pytest.raises(UserError, match="model"):
        run(_cfg(tmp_path / "no-model", distilled, tmp_path, "x"))
    with pytest.raises(UserError, match="deepspeed_config"):
        run(_cfg(random_tiny_model, distilled, tmp_path, "x", f"train.deepspeed_config={tmp_path}/ds.json"))
    # Rows another model wrote: its heads would learn the wrong model's habits.
    other = write_distilled(tmp_path / "other-rows", n=8, model="meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(UserError, match="holds rows distilled from meta-llama/Llama-3.1-8B-Instruct, not model="):
        run(_cfg(random_tiny_model, other, tmp_path, "y"))


@pytest.mark.slow
def test_bad_rows_are_skipped_and_counted_until_too_many(ray_session, random_tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": f"ok-{i}", "messages": m, "mode": "chat"} for i, m in enumerate(corpus.conversations(7, seed=1))]
    rows.insert(3, {"id": "broken-42", "messages": [{"role": "user", "content": "no reply"}], "mode": "chat"})
    pq.write_table(pa.Table.from_pylist(rows), data / "part-00000.parquet")
    common = ("train.num_workers=1", "train.zero_stage=0", "train.batch_size=8", "train.max_steps=1",
              "train.max_failures=0")
    # One bad row of 8 is within a limit of 20%: skipped, counted, named; the run goes on.
    result = run(_cfg(random_tiny_model, data, tmp_path, "some-bad", *common, "train.max_bad_rows=0.2"))
    assert result.data["bad_rows"] == 1 and result.data["rows"] == 7
    assert result.data["bad_examples"] == ["id=broken-42: no assistant turn to train on"]
    # Past the limit (default 1%): one line naming the row.
    with pytest.raises(UserError) as failed:
        run(_cfg(random_tiny_model, data, tmp_path, "too-bad", *common))
    assert str(failed.value) == ("train data: 1 of 8 rows cannot be trained on, more than train.max_bad_rows allows "
                                 "(0); e.g. id=broken-42: no assistant turn to train on")


@pytest.mark.slow
def test_a_finished_run_extends_when_rerun_with_more_steps(ray_session, random_tiny_model, tmp_path):
    """8 rows, one batch per epoch: the checkpoint at step 5 ends an epoch, and the re-run must start the next
    one rather than find its resumed epoch empty."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": f"r{i}", "messages": m, "mode": "chat"} for i, m in enumerate(corpus.conversations(8, seed=4))]
    pq.write_table(pa.Table.from_pylist(rows), data / "part-00000.parquet")
    common = ("train.num_workers=1", "train.zero_stage=0", "train.batch_size=8", "train.checkpoint_every=5")
    assert run(_cfg(random_tiny_model, data, tmp_path, "extend", *common, "train.max_steps=5")).global_step == 5
    result = run(_cfg(random_tiny_model, data, tmp_path, "extend", *common, "train.max_steps=10"))
    assert result.resumed_from == 5 and result.global_step == 10


def _straight_and_interrupted(model, data, tmp_path, monkeypatch, *overrides):
    """The same run twice: straight through, and failed at step 7 then resumed from its step-6 checkpoint.
    Each with the rows every rank read at every step."""

    def records(directory: Path) -> dict[tuple[int, int], list[str]]:
        out = {}
        for rank in range(2):
            for line in (directory / f"rank-{rank}.jsonl").read_text().splitlines():
                rec = json.loads(line)
                out[(rank, rec["step"])] = rec["ids"]  # a resumed attempt overwrites the lost steps
        return out

    runs = {}
    for name, fail_at in (("straight", {}), ("interrupted", {"train_fail_at_step": 7})):
        record = tmp_path / f"rows-{name}"
        record.mkdir()
        monkeypatch.setenv(*faults.env(train_record_rows_dir=str(record), **fail_at).popitem())
        cfg = _cfg(model, data, tmp_path, name, "train.zero_stage=2", "train.checkpoint_every=3", "train.seed=5",
                   "train.max_failures=1", "train.feature_cache=true", *overrides)
        runs[name] = (run(cfg), records(record))
    return runs["straight"], runs["interrupted"]


def _assert_same_weights(straight, resumed) -> None:
    import torch

    a, b = checkpoints.read_weights(Path(straight.checkpoint)), checkpoints.read_weights(Path(resumed.checkpoint))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resumed_run_reads_exactly_the_rows_an_uninterrupted_one_does(ray_session, random_tiny_model, distilled,
                                                                       tmp_path, monkeypatch):
    """Shuffled every epoch, interrupted at step 7 and resumed from the step-6 checkpoint: per rank and step the
    same rows as a run that was never interrupted (none twice, none skipped), and the same final weights."""
    (straight, straight_rows), (resumed, resumed_rows) = _straight_and_interrupted(
        random_tiny_model, distilled, tmp_path, monkeypatch, "train.max_steps=40")
    assert resumed.resumed_from == 6 and straight.global_step == resumed.global_step == 40
    assert resumed_rows == straight_rows
    # Within an epoch (216 training rows: 256, less 17 repeated ids and 23 for validation) no row comes twice;
    # 40 steps of 2 x 4 rows run into the next epoch, which repeats rows.
    first = [i for (rank, step), batch in straight_rows.items() if step <= 13 for i in batch]
    assert len(first) == 13 * 2 * 4 == len(set(first))
    assert sum(len(b) for b in straight_rows.values()) > len({i for b in straight_rows.values() for i in b})
    _assert_same_weights(straight, resumed)


@pytest.mark.slow
def test_resume_is_exact_with_soft_targets_and_several_samples_per_prompt(ray_session, random_tiny_model,
                                                                         distilled, tmp_path, monkeypatch):
    """Issue 23: with soft targets (from the feature cache) and two replies per prompt (rows ``<id>`` and
    ``<id>#s1``), a resumed run still reads the rows a straight one does and ends with the same weights."""
    sampled = tmp_path / "sampled"
    sampled.mkdir()
    for shard in sorted(distilled.glob("*.parquet")):
        rows = pq.read_table(shard).to_pylist()
        second = [{**r, "id": f"{r['id']}#s1",
                   "messages": [{**m, "content": m["content"][::-1]} if m["role"] == "assistant" else m
                                for m in r["messages"]]} for r in rows]
        pq.write_table(pa.Table.from_pylist(rows + second, schema=pq.read_schema(shard)), sampled / shard.name)
    (straight, straight_rows), (resumed, resumed_rows) = _straight_and_interrupted(
        random_tiny_model, sampled, tmp_path, monkeypatch, "train.max_steps=12", "train.soft_target_weight=0.5")
    assert resumed.resumed_from == 6 and straight.global_step == resumed.global_step == 12
    assert resumed_rows == straight_rows
    assert any(i.endswith("#s1") for b in straight_rows.values() for i in b)
    _assert_same_weights(straight, resumed)


def test_export_without_checkpoint_picks_the_best_validated_one(random_tiny_model, tmp_path, capsys):
    from medusa_ray.export import _checkpoint_path

    names = []
    for step, score in ((3, 2.4), (6, 2.1)):  # the later checkpoint validated worse
        ckpt = tmp_path / "best" / checkpoints.checkpoint_dir_name(step)
        (ckpt / "deepspeed").mkdir(parents=True)
        meta = {"format": checkpoints.FORMAT, "global_step": step, "validation": {"expected_acceptance": score}}
        (ckpt / checkpoints.META_FILE).write_text(json.dumps(meta))
        names.append(ckpt.name)
    register_checkpoints(tmp_path / "best", names)
    cfg = _cfg(random_tiny_model, tmp_path, tmp_path, "best")
    assert _checkpoint_path(cfg, None) == str(tmp_path / "best" / names[0])
    assert "exporting step 3 of run 'best': best validation expected acceptance 2.400 of 2 checkpoint(s)" in \
        capsys.readouterr().out
