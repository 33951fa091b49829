"""Publish only what pays: ``export.push_if`` gates the pipeline's push on eval's (or the benchmark's) numbers.

Driven without Ray: the pipeline's gate and push on an export directory, against the Hub stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medusa_ray.config import build_config
from medusa_ray.errors import UserError

TOKEN = "hf_standin_publish_token_456"


def _export(out: Path) -> Path:
    """An export directory as ``export`` writes it (marker, config, weights, local file), made by hand."""
    from medusa_ray.export import MARKER_FILE, write_model_card
    from medusa_ray.export.files import EXPORT_FORMAT, LOCAL_FILE

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model_type": "medusa", "medusa_num_heads": 2,
                                                 "medusa_num_layers": 1, "hidden_size": 128, "vocab_size": 1024}))
    (out / "medusa_lm_head.safetensors").write_bytes(b"weights")
    meta = {"method": "medusa", "medusa_num_heads": 2, "medusa_num_layers": 1, "share_lm_head": False,
            "global_step": 10, "zero_stage": 2, "world_size": 1, "config": {"train": {}}}
    (out / MARKER_FILE).write_text(json.dumps({"format": EXPORT_FORMAT, "base_model": "org/base",
                                               "base_is_local": False, "location": "models/export",
                                               "meta": meta}))
    (out / LOCAL_FILE).write_text(json.dumps({"base_model": "/home/me/base"}))
    write_model_card(out)
    return out


def test_the_gate_names_what_held_and_what_fell_short():
    from medusa_ray.pipeline import push_gate

    push_if = build_config({}, ["export.push_if={min_acceptance_length: 1.5, min_speedup: 1.1}"]).export.push_if
    assert push_gate(push_if, 2.0, 1.3, "16 clients") == (
        True, "acceptance length 2.000 >= 1.5; speed-up 1.300 (16 clients) >= 1.1")
    assert push_gate(push_if, 2.0, 0.9, "16 clients") == (False, "speed-up 0.900 (16 clients) < 1.1")
    assert push_gate(push_if, None, 1.3, "offline eval") == (False, "acceptance length not measured < 1.5")
    only = build_config({}, ["export.push_if={min_speedup: 1.1}"]).export.push_if
    assert push_gate(only, 1.0, 1.2, "offline eval")[0]


def test_pipeline_pushes_only_when_the_thresholds_hold(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants
    from hub_standin import HubStandIn

    from medusa_ray import pipeline

    out = _export(tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cfg = build_config({}, ["export.push_to_hub=medusa-org/tiny", "export.private=true",
                            "export.push_if={min_acceptance_length: 1.5, min_speedup: 1.1}"])
    with HubStandIn(token=TOKEN, writable_orgs={"medusa-org"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

        # The stages export without pushing; the pipeline decides at the end.
        assert pipeline._hold_push(cfg).export.push_to_hub is None

        caplog.set_level("INFO", logger="medusa_ray.pipeline")
        url, decision = pipeline._publish(cfg, "medusa", str(out), 2.4, 0.95, "16 clients")
        assert url is None and "not pushed to medusa-org/tiny" in decision and "speed-up 0.950 (16 clients)" in decision
        assert hub.repos == {}  # nothing uploaded, not even an empty repo created
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        lines = [r for r in caplog.records if "export.push_if" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelname == "WARNING"

        caplog.clear()
        url, decision = pipeline._publish(cfg, "medusa", str(out), 2.4, 1.25, "16 clients")
        assert url and decision.startswith("pushed medusa to ")
        repo = hub.repos["medusa-org/tiny"]
        assert repo.private and len(repo.commits) == 1
        assert set(repo.files) == {p.name for p in out.iterdir()} - {".medusa_ray_local.json"}
        assert "medusa-org/tiny" in repo.files["README.md"].decode()  # the card names the repo it is in
        lines = [r for r in caplog.records if "export.push_if" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelname == "INFO"

    # Without thresholds the pipeline leaves pushing to export, as before.
    plain = build_config({}, ["export.push_to_hub=medusa-org/tiny"])
    assert pipeline._hold_push(plain) is plain and pipeline._publish(plain, "medusa", str(out), 1.0, 0.5, "") == (
        None, None)


def test_a_gated_push_without_a_token_is_refused_before_any_stage(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from medusa_ray import pipeline

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cfg = build_config({}, ["export.push_to_hub=medusa-org/tiny", "export.push_if={min_speedup: 1.1}"])
    with pytest.raises(UserError, match="export.push_to_hub=medusa-org/tiny: no Hugging Face token"):
        pipeline._hold_push(cfg)


def _bench_results(speedups: dict[str, list[float]], target: int) -> dict:
    levels = []
    for i, c in enumerate((1, 4, 16)):
        models = {"base": {"requests": 8, "ok": 8, "tokens_per_s": 100.0 * c, "ttft_p50_ms": 10.0,
                           "itl_p50_ms": 2.0}}
        for name, s in speedups.items():
            models[name] = {**models["base"], "tokens_per_s": 100.0 * c * s[i], "speedup": s[i], "identical": True}
        levels.append({"concurrency": c, "models": models})
    results = {"levels": levels, "target_concurrency": target, "max_tokens": 64, "url": "http://10.0.0.3:8000/v1",
               "base_model": "/home/me/base", "drafters": {}}
    from medusa_ray.serve.bench import speedup_at, stops_paying

    for name in speedups:
        results["drafters"][name] = {"method": name, "draft_dir": f"/home/me/export-{name}", "acceptance_length": 2.0,
                                     "num_speculative_tokens": 3, "stops_paying_at": stops_paying(results, name),
                                     "speedup_at_target": speedup_at(results, name, target), "identical": True}
    paying = {n: d["speedup_at_target"] for n, d in results["drafters"].items() if d["speedup_at_target"] > 1}
    results["best_at_target"] = max(paying, key=paying.get) if paying else None
    return results


def test_the_pipeline_chooses_at_the_target_load_and_the_card_says_where_it_stops_paying(tmp_path, monkeypatch):
    from medusa_ray import pipeline
    from medusa_ray.serve import bench
    from medusa_ray.serve.bench import BenchResult

    # Offline, eagle3 looked faster; at 16 clients only medusa still pays.
    exports = {m: _export(tmp_path / f"export-{m}") for m in ("medusa", "eagle3")}
    runs = {m: {"export_dir": str(exports[m]), "speedup": s, "acceptance_length": 2.0, "outputs_identical": True,
                "plots": []} for m, s in (("medusa", 1.3), ("eagle3", 1.6))}
    results = _bench_results({"medusa": [1.8, 1.4, 1.1], "eagle3": [2.0, 1.2, 0.8]}, target=16)
    monkeypatch.setattr(bench, "run", lambda cfg, draft_dirs: BenchResult(results, plot=str(tmp_path / "b.png")))
    cfg = build_config({}, ["eval.concurrency=[1, 4, 16]", "eval.target_concurrency=16"])
    pipeline._bench(cfg, tmp_path, runs)
    assert runs["medusa"]["speedup"] == 1.1 and runs["eagle3"]["speedup"] == 0.8
    assert runs["eagle3"]["speedup_offline"] == 1.6 and runs["medusa"]["speedup_where"] == "16 clients"
    assert max(runs, key=lambda m: runs[m]["speedup"]) == "medusa"

    card = (exports["eagle3"] / "README.md").read_text()
    assert "## Under load" in card and "This drafter stops paying at 16 concurrent clients" in card
    assert "At the target load (16 concurrent clients) `medusa` is faster; this one: 0.80x." in card
    assert "| 4 | 400 | 480 | 1.2 |" in card
    published = json.loads((exports["eagle3"] / "bench_results.json").read_text())
    assert "/home/me" not in json.dumps(published) and "10.0.0.3" not in json.dumps(published)

    # Nothing pays at the target: the card says so plainly.
    results = _bench_results({"medusa": [1.5, 1.0, 0.9]}, target=16)
    monkeypatch.setattr(bench, "run", lambda cfg, draft_dirs: BenchResult(results, plot=str(tmp_path / "b.png")))
    pipeline._bench(cfg, tmp_path, {"medusa": {**runs["medusa"], "speedup": 1.3}})
    card = (exports["medusa"] / "README.md").read_text()
    assert "**At the target load (16 concurrent clients) no drafter beats plain decoding**" in card
    assert "stops paying at 4 concurrent clients" in card
