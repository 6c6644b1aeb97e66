# The two quickstart commands are `make train` (the main job) and `make test`; both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch 2.14.1 is the CUDA 13.0 build the development machines carry; triton comes with it.
TORCH_SPEC ?= torch==2.14.1
INSTALL_STAMP := build/.installed

.PHONY: install train test bench cmake-test gpu-check clean

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): setup.py pyproject.toml csrc/SOURCES $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/include/hiertcn/*.h)
	$(PIP) install -q "$(TORCH_SPEC)" ninja numpy matplotlib tqdm pytest pytest-benchmark
	# The built-in data set (MovieLens-100k) ships inside the recbole wheel; its dependencies are not needed.
	$(PIP) install -q --no-deps recbole==1.2.1
	$(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $(INSTALL_STAMP)

train: install
	$(PYTHON) -m hiertcn_fast train

test: install
	$(PYTHON) -m pytest tests -q

bench: install
	$(PYTHON) -m pytest benchmarks -q
	$(PYTHON) benchmarks/bench_data.py --quick

cmake-test: install
	rm -rf build/cmake
	cmake -S . -B build/cmake -G Ninja
	cmake --build build/cmake -j
	ctest --test-dir build/cmake --output-on-failure

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build hiertcn_fast/_C*.so *.egg-info benchmarks/results
