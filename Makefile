# Set-up and entry points. `make demo` and `make test` each build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; an unpinned torch may pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
DEMO := build/demo

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# .venv with torch's CPU build and the package; build/ipykernel6 holds ipykernel 6, which the package allows
# beside 7: the panel tests run a kernel on each.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test,examples]'
	rm -rf build/ipykernel6
	$(PY) -m pip install -q --no-deps --target build/ipykernel6 'ipykernel>=6.20,<7' nest_asyncio
	touch $@

# The quickstart notebook, run headless in $(DEMO); the executed copy keeps its outputs and widget state.
demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	cp notebooks/quickstart.ipynb $(DEMO)/
	$(VENV)/bin/jupyter execute --inplace --timeout=900 $(DEMO)/quickstart.ipynb
	$(PY) notebooks/summary.py $(DEMO)/quickstart.ipynb

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
	$(PY) benchmarks/panel.py

clean:
	rm -rf $(VENV) build *.egg-info
