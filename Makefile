# vubd: `make run` serves a demo disk, `make test` installs what the tests need and runs them.

CARGO ?= cargo

.PHONY: all build run test bench deps lint clean

all: build

build:
	$(CARGO) build --release --bin vubd --example loadgen

run: build
	./scripts/run-demo.sh

deps:
	./scripts/install-test-deps.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings

# Everything: formatting, lints, unit tests, integration tests against the real binary, and a
# Linux guest under QEMU (required here, not skipped).
test: deps lint
	VUBD_REQUIRE_GUEST=1 $(CARGO) test --all-targets

# vubd against qemu-storage-daemon, side by side; writes docs/benchmarks.md and its chart.
# Options through BENCH_ARGS, e.g. BENCH_ARGS="--dir /var/tmp --cache none" for a real disk.
BENCH_ARGS ?=
bench: deps build
	$(CARGO) run --release --example bench -- $(BENCH_ARGS)

clean:
	$(CARGO) clean
	rm -rf demo
