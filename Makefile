# vubd: `make run` serves a demo disk, `make test` installs what the tests need and runs them.

CARGO ?= cargo

.PHONY: all build run test deps lint unit clean

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

clean:
	$(CARGO) clean
	rm -rf demo
