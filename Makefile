# Set-up and entry points. `make demo` and `make test` each build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; an unpinned torch may pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
DEMO := build/demo

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test,examples]'
	touch $@

demo: install
	rm -rf $(DEMO)
	$(PY) -m dlnest_jupyter new $(DEMO) --mnist
	$(PY) -m dlnest_jupyter run -c $(DEMO)/root_config.json --cpu -d quickstart
	$(PY) -m dlnest_jupyter analyze -r "$$(ls -d $(DEMO)/Saves/*/ | tail -n 1)" -s getAcc --cpu

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/snapshot.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/dispatch.py
	$(PY) benchmarks/analyzer.py
	$(PY) benchmarks/ddp.py
	$(PY) benchmarks/server.py

clean:
	rm -rf $(VENV) build *.egg-info
