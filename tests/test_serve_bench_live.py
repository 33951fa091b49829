"""The served app for real: Serve LLM on CPU on loopback, the openai client, a drafter against the plain base.

One test (the suite's time budget): an untrained Medusa export of the tiny model served beside the plain base in
one app, the load benchmark at 1 and 4 clients, with traffic capture on. An untrained drafter is enough: what is
checked is that speculation leaves greedy outputs unchanged, that the table has its columns, and that vLLM's
acceptance counters reach us through Ray's metrics. EAGLE-3 behind Serve was run by hand (with a third engine this
test took 2 to 4.5 minutes on 2 shared cores; docs/serve.md has that run's table); ``test_eagle3.py`` covers
EAGLE-3 in vLLM.
"""

from __future__ import annotations

import json

import pytest
from test_eval import CONV, _export_like

from medusa_ray.config import build_config

pytestmark = pytest.mark.slow


def test_bench_serves_base_and_drafters_with_identical_greedy_outputs(tmp_path, tiny_model, ray_session):
    from medusa_ray.serve import bench

    medusa = _export_like(tmp_path / "medusa", tiny_model, heads=2)
    prompts = tmp_path / "prompts.jsonl"
    asks = ["Count from 1 to 9.", "Spell the word tiger.", "List the weekdays.", "What is 7 times 6?"]
    prompts.write_text("".join(json.dumps({"messages": [CONV[0], {"role": "user", "content": a}]}) + "\n"
                               for a in asks))
    cfg = build_config({"model": str(tiny_model)}, [
        f"eval.prompts={prompts}", "eval.concurrency=[1, 4]", "eval.bench_requests=4", "eval.max_tokens=24",
        "eval.bench_timeout_s=120", f"eval.bench_plot={tmp_path / 'out' / 'bench.png'}",
        "serve.engine_kwargs={max_model_len: 256, enforce_eager: true}", "serve.stream_batching_interval_ms=0",
        "serve.accelerator=cpu", "serve.app_name=test-serve", "serve.startup_timeout_s=400",
        "serve.capture=true", f"serve.capture_dir={tmp_path / 'traffic'}"])
    results = bench.run(cfg, draft_dirs=[str(medusa)])

    assert [lv["concurrency"] for lv in results["levels"]] == [1, 4]
    for level in results["levels"]:
        assert set(level["models"]) == {"base", "medusa"}
        for name, m in level["models"].items():
            assert m["ok"] == m["requests"] == 4, (name, m["errors"])
            assert m["output_tokens"] > 0 and m["tokens_per_s"] > 0 and m["ttft_p50_ms"] > 0
        assert level["models"]["medusa"]["identical"], f"greedy outputs changed at {level['concurrency']}"
        assert level["models"]["medusa"]["speedup"] > 0
    assert results["outputs_identical"] and results["target_concurrency"] == 4
    # vLLM's own counters, through Ray's Prometheus endpoint: drafts were made and some accepted.
    assert results["drafters"]["medusa"]["acceptance_length"] is not None, results["drafters"]["medusa"]
    assert results["drafters"]["medusa"]["acceptance_length"] >= 1.0
    text = results.summary()
    assert text.splitlines()[0].split()[:3] == ["clients", "model", "ok"] and "speed-up" in text
    assert (tmp_path / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["levels"] == results["levels"]

    # Traffic capture (on here): every chat request the app answered, as distill input, read unchanged.
    from medusa_ray.data import Conversation, input_units, iter_records

    _, units = input_units(str(tmp_path / "traffic"))
    captured = [r for r in iter_records(units, None)]
    assert captured and all(isinstance(r, Conversation) for r in captured)
    sent = [json.loads(line)["messages"] for line in prompts.read_text().splitlines()]
    assert {json.dumps(r.messages) for r in captured} == {json.dumps(m) for m in sent}
    # warm-up (1 per model) + 2 levels x 4 requests x 2 models
    assert len(captured) == 2 + 2 * 4 * 2

    # The app is gone afterwards: a second run on the same cluster can take the port.
    from ray import serve

    assert "test-serve-bench" not in serve.status().applications
