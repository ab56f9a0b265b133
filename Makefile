# Two entry points (README.md): `make demo` runs the study, `make test` runs the tests.
# Each installs into .venv first when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test params install gpu-wheels

$(VENV)/.installed: pyproject.toml
	@echo "== installing skinaug and its dependencies into $(VENV) (torch from the local disk; ~2 min)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

params: $(VENV)/.installed  ## recompose params.yaml from conf/ (dvc exp run does this itself)
	$(PY) -c "import os; from dvc.utils.hydra import compose_and_dump; compose_and_dump('params.yaml', os.path.abspath('conf'), None, 'config', '.', [])"

demo: $(VENV)/.installed  ## the whole demo study on the CPU: dvc repro, its stages forked from one warm process
	@echo "== dvc repro (demo profile: embedded data, tiny model, CPU)"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m skinaug.prefork dvc repro
	@echo "== done: tables and figures in reports/"

test: $(VENV)/.installed  ## the test suite (fast and slow tests; no network)
	@echo "== pytest"
	$(PY) -m pytest -q

# The GPU check (benchmarks/README.md) runs where nothing can be downloaded: its packages travel as wheels.
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)
gpu-wheels:  ## download the wheels benchmarks/gpu_check.sh installs into .whl (Python 3.12, x86-64, ~27 MiB)
	rm -rf .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl -r benchmarks/gpu-wheels.txt
	python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	@du -sh .whl
