# The two quickstart commands are `make train` (the main job) and `make test`; both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch 2.14.1 is the CUDA 13.0 build the development machines carry; triton comes with it.
TORCH_SPEC ?= torch==2.14.1
INSTALL_STAMP := build/.installed

.PHONY: install train test test-emulated bench cmake-test gpu-prepare gpu-check clean

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): setup.py pyproject.toml csrc/SOURCES $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/include/hiertcn/*.h)
	$(PIP) install -q "$(TORCH_SPEC)" ninja numpy matplotlib tqdm pytest pytest-benchmark "setuptools>=70.1"
	# The built-in data set (MovieLens-100k) ships inside the recbole wheel; its dependencies are not needed.
	$(PIP) install -q --no-deps recbole==1.2.1
	$(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $(INSTALL_STAMP)

train: install
	$(PYTHON) -m hiertcn_fast train

test: install
	$(PYTHON) -m pytest tests -q

# The op and model suites with the cpu backend's ops running csrc/cuda's kernels in the CPU emulator
# (tests/cuda_emu). Left out: torch.compile and opcheck tests (they check the registration, not the kernels) and,
# in the op suites, the other backends' cases.
EMULATED_OP_SUITES := tests/test_causal_conv.py tests/test_tcn_step.py tests/test_nn_tcn.py tests/test_gru.py \
	tests/test_gru_gates.py tests/test_session_steps.py tests/test_py_mutants_ops.py tests/test_ops_audit_fixes.py \
	tests/test_conv_ops_differential.py tests/test_gru_ops_differential.py tests/test_conv_grad_mask.py \
	tests/test_gru_grad_mask.py
EMULATED_MODEL_SUITES := tests/test_serve.py tests/test_models_session.py tests/test_models_history.py tests/test_train.py \
	tests/test_py_mutants_train_models.py tests/test_py_mutants_serve_queue.py \
	tests/test_py_mutants_nn_loss.py tests/test_py_mutants_history_cli.py
test-emulated: install
	HIERTCN_EMULATE_CUDA=1 $(PYTHON) -m pytest $(EMULATED_OP_SUITES) -q -k "cpu and not compile and not opcheck"
	HIERTCN_EMULATE_CUDA=1 $(PYTHON) -m pytest $(EMULATED_MODEL_SUITES) -q -k "not compile and not opcheck"

bench: install
	$(PYTHON) -m pytest benchmarks -q
	$(PYTHON) benchmarks/bench_data.py --quick

cmake-test: install
	rm -rf build/cmake
	cmake -S . -B build/cmake -G Ninja
	cmake --build build/cmake -j
	ctest --test-dir build/cmake --output-on-failure

# The recbole wheel (ml-100k is inside it) for a lent GPU machine, whose image lacks it: carry .whl (git ignores it).
gpu-prepare:
	$(PIP) download -q --no-deps --only-binary=:all: -d .whl recbole==1.2.1

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build hiertcn_fast/_C*.so *.egg-info benchmarks/results
