# The project's own files install everything: `make setup` on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine kind's disk; asking for it first keeps pip
# from pulling a multi-GB CUDA build. On a GPU machine, set TORCH_SPEC= to skip it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo rehearse bench plan-all smoke-cluster vllm-check clean

setup: $(BIN)/charbuild

$(BIN)/charbuild: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/charbuild run specs/smoke-small.yaml

# The paper spec's dress rehearsal: specs/rehearsal.yaml (every stage of remorseful-paper.yaml
# and its ablation, on ~1% of the data) built end to end on a CPU, with the API roles on a
# loopback server; fails unless the report shows the final model and the oct preferences.
rehearse: setup
	$(BIN)/python tests/support/rehearse.py

# The smoke build on a 2-node Ray cluster with its cache on S3, all on loopback (needs root
# for the network namespace Ray's nodes share; CI runs it).
smoke-cluster: setup
	$(BIN)/python tests/support/cluster_smoke.py

# vLLM's own request, sampling, chat-template and LoRA-loader code, run on what charbuild
# hands it (tests/test_vllm_interop.py). The engine needs a GPU; these parts do not.
VLLM_SITE := .vllm
$(VLLM_SITE)/.installed: tests/vllm-requirements.txt
	rm -rf $(VLLM_SITE)
	$(BIN)/pip install -q --no-deps --no-compile --target $(VLLM_SITE) -r tests/vllm-requirements.txt
	touch $@

vllm-check: setup $(VLLM_SITE)/.installed
	PYTHONPATH=$(VLLM_SITE) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_vllm_interop.py

plan-all: setup
	for s in specs/*.yaml; do $(BIN)/charbuild plan $$s > /dev/null || exit 1; echo "plan ok: $$s"; done

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_null_plan.py
	$(BIN)/python benchmarks/bench_openai_throughput.py
	$(BIN)/python benchmarks/bench_engine_overhead.py
	if [ -f benchmarks/bench_callcache.py ]; then $(BIN)/python benchmarks/bench_callcache.py; fi
	$(BIN)/python benchmarks/bench_input_verify.py
	$(BIN)/python benchmarks/bench_s3_cache.py
	$(BIN)/python benchmarks/bench_s3_calls.py
	$(BIN)/python benchmarks/eval_leak_model.py
	$(BIN)/python benchmarks/gpu_check.py --quick  # says so and exits 0 without a GPU

clean:
	rm -rf cache/objects cache/tmp cache/index cache/plans cache/locks outputs/*/
