# The two commands of README.md; each makes .venv/ first (scripts/bootstrap.sh) when anything is missing.
PY := .venv/bin/python
.PHONY: bench test bootstrap gpu-report

bootstrap:
	@bash scripts/bootstrap.sh

bench: bootstrap
	$(PY) -m cct_kernels bench $(ARGS)

test: bootstrap
	$(PY) -m pytest tests -q $(ARGS)

gpu-report:  # the GPU machine's preinstalled python3, no bootstrap (README "GPU run")
	python3 benchmarks/gpu_report.py $(ARGS)
