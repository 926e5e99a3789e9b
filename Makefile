# The project's commands. Each sets up what it needs (a virtualenv in .venv) on a fresh machine.
#   make demo   - the main job on local Ray: label a demo corpus with a demo checkpoint, for every task
#   make label  - the main job with your arguments: make label ARGS="--task ner --model ... --input ... --output ..."
#   make nightly - the nightly job: make nightly ARGS="--config deploy/nightly.yaml" (no ARGS: a demo)
#   make test   - the test suite
#   make bench  - benchmarks: the model against the reference (bloom-560m shape), the pipeline against a bare loop,
#                 the continuous-batching engine against static batches, the job against the Ray Data + transformers recipe
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build here; the package itself accepts a range (GPU builds included).
PIP_CONSTRAINTS ?= .ci/constraints.txt

.PHONY: install demo label nightly serve generate test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PIP_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(PIP_CONSTRAINTS) -e '.[test]'
	touch $@

demo: install
	for task in generate classify ner qa; do $(PY) jobs/label_corpus.py --task $$task $(ARGS) || exit 1; done

label: install
	$(PY) jobs/label_corpus.py $(ARGS)

nightly: install
	$(PY) jobs/nightly_annotate.py $(ARGS)

serve: install
	$(PY) jobs/serve_bloom.py $(ARGS)

generate: install
	$(PY) jobs/demo_generate.py $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) -m pip install -q -c $(PIP_CONSTRAINTS) -e '.[test,bench]'
	$(PY) benchmarks/bench_model.py $(ARGS)
	$(PY) benchmarks/bench_profile.py
	$(PY) benchmarks/bench_quant.py
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_gemv.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_pipeline.py --hidden 1024 --layers 12 --rows 1200 --fixed-timed-rows 400 --out benchmarks/results/bench_pipeline_1024x12.json
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_serve_generate.py --baseline 52de9e6
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_recipe.py
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_prefix.py
	$(PY) benchmarks/bench_constrained.py
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_serve_prefix.py --baseline 95b6b18
	$(PY) benchmarks/bench_engine.py --hidden 1024 --vocab 16384 --repeats 1 --out benchmarks/results/bench_engine_1024.json
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_delta.py
	$(PY) benchmarks/bench_lora.py
	$(PY) benchmarks/bench_lora.py --hidden 1024 --vocab 16384 --repeats 3 --out benchmarks/results/bench_lora_1024.json

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache
