# carrara — `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FONT   := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
CHROMIUM := /usr/bin/chromium

.PHONY: setup test test-slow demo lint clean

setup: $(STAMP) $(FONT) $(CHROMIUM)

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

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt) for the browser test"; \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null)); \
	else \
		echo "note: the browser test needs $(CHROMIUM): run 'sudo apt-get install chromium'"; \
	fi

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m carrara.demo

lint: setup
	$(BIN)/ruff check carrara tests bench experiments

clean:
	rm -rf $(VENV) demo .pytest_cache
