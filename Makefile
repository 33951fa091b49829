# The two commands a new user runs. Each builds .venv first if it is missing or stale.
PY := .venv/bin/python
DEMO_MODEL := outputs/demo/tiny-model

.PHONY: env demo test test-fast clean

env:
	@bash scripts/setup_env.sh

demo: env
	@test -f $(DEMO_MODEL)/config.json || $(PY) -m medusa_ray make-tiny-model $(DEMO_MODEL) --pretrain-steps 300
	$(PY) -m medusa_ray pipeline --config configs/demo.yaml

test: env
	$(PY) -m pytest tests

# The developer loop: everything that starts neither Ray nor vLLM (a few minutes at most).
test-fast: env
	$(PY) -m pytest -m "not slow" tests

clean:
	rm -rf outputs .pytest_cache
