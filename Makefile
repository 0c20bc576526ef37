# carrara — `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FONT   := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
CHROMIUM := /usr/bin/chromium
CXX_BIN  := /usr/bin/g++
EMOJI_TEST := /usr/share/unicode/emoji/emoji-test.txt

.PHONY: setup test test-avx2 test-slow demo lint clean

setup: $(STAMP) $(FONT) $(EMOJI_TEST) $(CHROMIUM) $(CXX_BIN)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # CPU build from a local file; unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

$(FONT):
	@if [ "$$(id -u)" = 0 ]; then \
		echo "installing fonts-noto-color-emoji (apt)"; \
		(apt-get install -y -qq fonts-noto-color-emoji >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq fonts-noto-color-emoji >/dev/null)); \
	else \
		echo "note: the emoji dataset needs $(FONT): run 'sudo apt-get install fonts-noto-color-emoji'"; \
	fi

$(EMOJI_TEST):
	@if [ "$$(id -u)" = 0 ]; then \
		echo "installing unicode-data (apt) for the emoji CLDR groups"; \
		(apt-get install -y -qq unicode-data >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq unicode-data >/dev/null)); \
	else \
		echo "note: emoji group captions need $(EMOJI_TEST): run 'sudo apt-get install unicode-data'"; \
	fi

$(CXX_BIN):
	@if [ "$$(id -u)" = 0 ]; then \
		echo "installing g++ (apt) for carrara compile (AOTInductor)"; \
		(apt-get install -y -qq g++ >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq g++ >/dev/null)); \
	else \
		echo "note: carrara compile needs a C++ compiler: run 'sudo apt-get install g++'"; \
	fi

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt) for the browser test"; \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null)); \
	else \
		echo "note: the browser test needs $(CHROMIUM): run 'sudo apt-get install chromium'"; \
	fi

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2  # both cores: one test process each (tests run one thread)

# The suite on the AVX2 kind's code paths from any CPU: PyTorch's AVX2 kernels, oneDNN and FBGEMM (int8) capped at
# AVX2, and carrara's fp32 path (CARRARA_BF16=0; an AVX-512 BF16 CPU would otherwise pick bf16). See
# docs/performance.md.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 CARRARA_BF16=0

# The bench scripts' --tiny runs (tests/test_bench_*.py) check orchestration, not kernels: make test runs them.
# tests/test_compiled.py too: inductor compiles for the CPU's own ISA whatever ATEN_CPU_CAPABILITY says.
test-avx2: setup
	$(AVX2) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --ignore-glob='tests/test_bench_*.py' \
		--ignore=tests/test_compiled.py

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m carrara.demo

lint: setup
	$(BIN)/ruff check carrara tests bench experiments

clean:
	rm -rf $(VENV) demo .pytest_cache
