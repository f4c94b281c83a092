# Two commands do everything on a fresh machine:
#   make run    install, then start the app on the embedded model (http://127.0.0.1:7860)
#   make test   install with test tools, then run the whole test suite
ARGS ?=

.PHONY: install install-dev run test bench

install:
	./scripts/install.sh

install-dev:
	./scripts/install.sh --dev

run: install
	.venv/bin/rlhf-studio $(ARGS)

test: install-dev
	.venv/bin/python -m pytest -q -rs --durations=25 -n 2 --dist loadfile --no-loadscope-reorder tests

bench: install-dev
	.venv/bin/python bench/bench_foundation.py
