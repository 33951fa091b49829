"""Traffic capture: off by default; when on, what the served app records is what distill reads, unchanged."""

from __future__ import annotations

import json

import pytest

from medusa_ray.config import build_config
from medusa_ray.errors import UserError


def test_capture_is_off_by_default_and_its_directory_is_checked(tmp_path):
    from medusa_ray.serve.capture import capture_settings

    cfg = build_config({})
    assert cfg.serve.capture is False
    on = build_config({"distill": {"output_dir": str(tmp_path / "run" / "distilled")}},
                      ["serve.capture=true", "serve.capture_rate=0.5", "serve.capture_max_mb=1"])
    assert capture_settings(on) == {"directory": str(tmp_path / "run" / "traffic"), "rate": 0.5,
                                    "max_bytes": 2**20}
    with pytest.raises(UserError, match="serve.capture_dir=s3://b/t: must be a local"):
        capture_settings(build_config({}, ["serve.capture=true", "serve.capture_dir=s3://b/t"]))
    with pytest.raises(UserError, match="serve.capture_rate"):
        build_config({}, ["serve.capture_rate=0"])


def test_recorded_requests_are_distill_input_unchanged(tmp_path):
    from medusa_ray.data import Conversation, input_units, iter_records
    from medusa_ray.serve.capture import Recorder

    traffic = tmp_path / "traffic"
    first, second = Recorder(str(traffic)), Recorder(str(traffic))  # two ingress replicas, a file each
    requests = [
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Count to 5."}],
        # Multi-part content keeps its text; tool turns and images are not distill's.
        [{"role": "user", "content": [{"type": "text", "text": "Spell "}, {"type": "text", "text": "tiger."},
                                      {"type": "image_url", "image_url": {"url": "data:..."}}]},
         {"role": "tool", "content": "x", "tool_call_id": "1"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "Name the weekdays."}],
    ]
    assert first.record(requests[0]) and second.record(requests[1]) and first.record(requests[2])
    assert not first.record([{"role": "assistant", "content": "no user turn"}])
    assert not first.record(None)  # never raises

    _, units = input_units(str(traffic))
    got = [r.messages for r in iter_records(units, None) if isinstance(r, Conversation)]
    expected = [requests[0], [{"role": "user", "content": "Spell tiger."}], requests[2]]
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, expected))
    assert all(isinstance(r, Conversation) for r in iter_records(units, None))


def test_sampling_and_the_size_cap(tmp_path):
    from medusa_ray.serve.capture import Recorder

    msg = [{"role": "user", "content": "x" * 100}]
    sampled = Recorder(str(tmp_path / "a"), rate=0.25, seed=1)
    kept = sum(sampled.record(msg) for _ in range(400))
    assert 60 < kept < 140
    capped = Recorder(str(tmp_path / "b"), max_bytes=1000)
    line = len(json.dumps({"messages": msg}).encode()) + 1
    assert sum(capped.record(msg) for _ in range(50)) == 1000 // line and capped.full
    assert capped.path.stat().st_size <= 1000
