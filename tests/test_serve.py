"""serve and bench without Ray: what is served, the drafter-vs-base check, scaling, the benchmark's numbers.

The served app itself (Serve LLM on CPU, the openai client, identical greedy outputs) is
``test_serve_bench_live.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medusa_ray.config import build_config
from medusa_ray.errors import UserError


def _medusa_export(out: Path, base: Path, heads: int = 2, **config) -> Path:
    """A Medusa export's config.json (what ``drafters.detect`` and the check read; no weights needed)."""
    base_cfg = json.loads((base / "config.json").read_text())
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({
        "model_type": "medusa", "medusa_num_heads": heads, "medusa_num_layers": 1,
        "hidden_size": base_cfg["hidden_size"], "vocab_size": base_cfg["vocab_size"], "medusa_fc_bias": True,
        "base_model_name_or_path": str(base), **config}))
    return out


def _eagle3_export(out: Path, base: Path, architectures: list[str]) -> Path:
    base_cfg = json.loads((base / "config.json").read_text())
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({
        "speculators_model_type": "eagle3",
        "transformer_layer_config": {"hidden_size": base_cfg["hidden_size"], "vocab_size": base_cfg["vocab_size"]},
        "speculators_config": {"proposal_methods": [{"speculative_tokens": 3}],
                               "verifier": {"name_or_path": str(base), "architectures": architectures}}}))
    return out


def test_the_served_model_takes_its_speculative_config_from_the_drafter(tmp_path, random_tiny_model):
    from medusa_ray.serve import served_model

    export = _medusa_export(tmp_path / "export", random_tiny_model)
    cfg = build_config({"model": str(random_tiny_model)})
    model = served_model(cfg, str(export))
    assert model.method == "medusa" and model.base == str(random_tiny_model)
    assert model.speculative_config == {"method": "medusa", "model": str(export), "num_speculative_tokens": 2}
    assert model.model_id == random_tiny_model.name
    plain = served_model(cfg, None)
    assert plain.speculative_config is None and plain.method is None
    with pytest.raises(UserError, match="serve.num_speculative_tokens=3 but .* drafts at most 2"):
        served_model(build_config({"model": str(random_tiny_model)}, ["serve.num_speculative_tokens=3"]),
                     str(export))


def test_a_drafter_for_another_base_is_refused_naming_the_mismatch(tmp_path, random_tiny_model):
    from medusa_ray.serve import check_drafter, served_model

    cfg = build_config({"model": str(random_tiny_model)})
    vocab = _medusa_export(tmp_path / "vocab", random_tiny_model, vocab_size=32000)
    with pytest.raises(UserError, match=r"does not match base model .*: vocabulary size 32000 \(drafter\) vs "):
        served_model(cfg, str(vocab))
    hidden = _medusa_export(tmp_path / "hidden", random_tiny_model, hidden_size=4096)
    with pytest.raises(UserError, match=r"hidden size 4096 \(drafter\) vs 128 \(base\)"):
        check_drafter(str(random_tiny_model), hidden)
    arch = _eagle3_export(tmp_path / "arch", random_tiny_model, ["Qwen2ForCausalLM"])
    with pytest.raises(UserError, match=r"architecture Qwen2ForCausalLM \(drafter\) vs LlamaForCausalLM \(base\)"):
        check_drafter(str(random_tiny_model), arch)
    ok = _eagle3_export(tmp_path / "ok", random_tiny_model, ["LlamaForCausalLM"])
    check_drafter(str(random_tiny_model), ok)
    assert served_model(cfg, str(ok)).speculative_config["method"] == "eagle3"


def test_replicas_are_fixed_or_autoscale_from_the_config():
    from medusa_ray.serve import deployment_config

    assert deployment_config(build_config({}, ["serve.num_replicas=2"])) == {"num_replicas": 2}
    scaled = deployment_config(build_config({}, ["serve.min_replicas=0", "serve.max_replicas=4",
                                                 "serve.target_ongoing_requests=8"]))
    assert scaled == {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                             "target_ongoing_requests": 8}}
    with pytest.raises(UserError, match="serve: .*min_replicas must not exceed max_replicas"):
        build_config({}, ["serve.min_replicas=3", "serve.max_replicas=2"])


def test_cli_flags_are_overrides(tmp_path):
    from medusa_ray import cli

    args = cli.build_parser().parse_args(["serve", "--no-draft", "--port", "8123", "--detach"])
    cfg = cli.config_from_args(args)
    assert args.no_draft and args.detach and cfg.serve.port == 8123
    args = cli.build_parser().parse_args(["bench", "--draft", "a", "--draft", "b", "--concurrency", "1,4",
                                          "--requests", "6", "--target", "4"])
    cfg = cli.config_from_args(args)
    assert args.draft == ["a", "b"] and cfg.eval.concurrency == [1, 4]
    assert cfg.eval.bench_requests == 6 and cfg.eval.target_concurrency == 4
    assert build_config({}).eval.concurrency == [1, 4, 16, 64]


def _level(concurrency: int, base_tps: float, drafters: dict[str, float]) -> dict:
    row = {"concurrency": concurrency, "models": {"base": {"requests": 4, "ok": 4, "ttft_p50_ms": 10.0,
                                                           "ttft_p99_ms": 20.0, "itl_p50_ms": 2.0,
                                                           "itl_p99_ms": 3.0, "tokens_per_s": base_tps}}}
    for name, tps in drafters.items():
        row["models"][name] = {**row["models"]["base"], "tokens_per_s": tps, "speedup": tps / base_tps,
                               "identical": True}
    return row


def test_bench_numbers_table_and_plot(tmp_path):
    from medusa_ray.serve.bench import (
        Request,
        plot,
        speedup_at,
        stops_paying,
        summarize_level,
        table,
    )

    requests = [Request(ok=True, text="x", tokens=11, ttft=0.1 * i, latency=0.1 * i + 1.0) for i in range(1, 6)]
    requests.append(Request(ok=False, error="APITimeoutError: timed out"))
    s = summarize_level(requests, wall_s=5.0)
    assert s["ok"] == 5 and s["failed"] == 1 and s["output_tokens"] == 55 and s["tokens_per_s"] == 11.0
    assert s["ttft_p50_ms"] == pytest.approx(300.0) and s["itl_p50_ms"] == pytest.approx(100.0)
    assert s["ttft_p99_ms"] == pytest.approx(496.0)

    results = {"levels": [_level(1, 100.0, {"medusa": 180.0, "eagle3": 150.0}),
                          _level(4, 300.0, {"medusa": 330.0, "eagle3": 240.0}),
                          _level(16, 600.0, {"medusa": 540.0, "eagle3": 420.0})],
               "target_concurrency": 16, "best_at_target": None,
               "drafters": {"medusa": {"acceptance_length": 2.5}, "eagle3": {"acceptance_length": None}}}
    assert stops_paying(results, "medusa") == 16 and stops_paying(results, "eagle3") == 4
    assert speedup_at(results, "medusa", 4) == pytest.approx(1.1)
    for name in results["drafters"]:
        results["drafters"][name]["stops_paying_at"] = stops_paying(results, name)
    text = table(results)
    header = text.splitlines()[0].split()
    assert header == ["clients", "model", "ok", "TTFT", "p50", "p99", "ITL", "p50", "p99", "tokens/s", "speed-up",
                      "identical"]
    assert "medusa: acceptance length 2.500" in text and "stops paying at 16 clients" in text
    assert "at 16 clients: no drafter beats plain decoding" in text
    png = plot(results, tmp_path / "b" / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spec_decode_counters_are_read_per_model_from_prometheus_text():
    from medusa_ray.serve.bench import parse_spec_counters

    text = "\n".join([
        '# HELP ray_vllm_spec_decode_num_drafts Number of spec decoding drafts.',
        'ray_vllm_spec_decode_num_drafts_total{ReplicaId="x",model_name="medusa",WorkerId="1"} 40.0',
        'ray_vllm_spec_decode_num_accepted_tokens_total{ReplicaId="x",model_name="medusa"} 60.0',
        'ray_vllm_spec_decode_num_accepted_tokens_per_pos_total{model_name="medusa",position="0"} 30.0',
        'ray_vllm_spec_decode_num_drafts_total{ReplicaId="bench:LLMServer:eagle3#abc",model_name="/m/tiny"} 10.0',
        'ray_vllm_spec_decode_num_accepted_tokens_total{ReplicaId="bench:LLMServer:eagle3#abc",'
        'model_name="/m/tiny"} 5.0',
        'ray_vllm_num_requests_running{model_name="medusa"} 1.0',
    ])
    got = parse_spec_counters(text, ["medusa", "eagle3"])
    assert got == {"medusa": {"drafts": 40.0, "accepted": 60.0}, "eagle3": {"drafts": 10.0, "accepted": 5.0}}


def test_the_cli_refuses_a_mismatched_drafter_in_one_line_before_starting_anything(tmp_path, random_tiny_model,
                                                                                  capsys):
    from medusa_ray import cli

    export = _medusa_export(tmp_path / "export", random_tiny_model, hidden_size=4096)
    code = cli.main(["serve", "--draft", str(export), "--model", str(random_tiny_model),
                     f"distill.output_dir={tmp_path / 'run' / 'distilled'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("medusa-ray serve: error: the drafter in ") and "hidden size 4096 (drafter)" in err[0]


def test_serving_stops_and_deletes_the_app_on_sigterm(capsys):
    import os
    import signal
    import threading

    from medusa_ray import cli

    class Result:
        deleted = False

        def shutdown(self):
            self.deleted = True

    result = Result()
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()  # `ray job stop`, Kubernetes
        cli.serve_until_interrupted(result)
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
    assert result.deleted and "stopping" in capsys.readouterr().out
