# hps-exp: `make setup && make run` on a fresh machine; `make test` for the test suite.
PYTHON_BIN ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
SWEEP      ?= main_small

.PHONY: setup run test test-peer sweep table clean

setup:  ## create .venv and install the pinned stack (torch 2.13.0; CPU build where one is on disk)
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@$(PY) -c "import torch, transformers, hydra; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"

run:  ## the embedded default: tiny model + synthetic data, SFT -> DPO -> evaluation (a few minutes on CPU)
	$(PY) -m hps_exp $(ARGS)

test:  ## the test suite (CI runs exactly this)
	$(PY) -m pytest -q $(ARGS)

test-peer:  ## losses against TRL 0.19's own dpo_loss, in a separate venv (trl is not a dependency)
	$(PYTHON_BIN) -m venv .venv-peer
	.venv-peer/bin/python -m pip install --quiet torch==2.13.0 trl==0.19.1 transformers==4.53.3 pytest
	PYTHONPATH=. .venv-peer/bin/python -m pytest -q -p no:cacheprovider tests/test_losses.py -k trl

sweep:  ## run a grid from sweeps/: make sweep SWEEP=main_small
	$(PY) -m hps_exp.sweep $(SWEEP) $(ARGS)

table:  ## collect a sweep's runs into Markdown/CSV tables and plots
	$(PY) -m hps_exp.tables outputs/sweeps/$(SWEEP) $(ARGS)

clean:
	rm -rf outputs/runs outputs/multirun
