# vubd: `make run` serves a demo disk, `make test` installs what the tests need and runs them.

CARGO ?= cargo

.PHONY: all build run test bench guest-bench deps lint clean fuzz fuzz-smoke fuzz-seeds deb

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
test: deps lint fuzz-smoke deb
	VUBD_REQUIRE_GUEST=1 $(CARGO) test --all-targets

# Fuzzing with cargo-fuzz (fuzz/, docs/usage.md "Fuzzing"): every target for FUZZ_SECONDS
# each, one after another, a line per target (runs, coverage, time). Crashes go to
# fuzz/artifacts/TARGET/. Installs cargo-fuzz if missing; nightly (with AddressSanitizer) if
# rustup has it, else stable without a sanitizer. FUZZ_TARGETS picks some targets only.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?=
fuzz:
	./scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Part of `make test`: the targets still build and survive FUZZ_SMOKE_SECONDS each.
FUZZ_SMOKE_SECONDS ?= 20
fuzz-smoke:
	./scripts/fuzz.sh $(FUZZ_SMOKE_SECONDS)

# Regenerate the qcow2 seed images (needs qemu-img and qemu-io: `make deps`).
fuzz-seeds:
	./fuzz/seeds.sh

# vubd against qemu-storage-daemon, side by side; writes docs/benchmarks.md and its chart.
# Options through BENCH_ARGS, e.g. BENCH_ARGS="--dir /var/tmp --cache none" for a real disk.
BENCH_ARGS ?=
bench: deps build
	$(CARGO) run --release --example bench -- $(BENCH_ARGS)

# fio inside a Linux guest under QEMU (KVM if it works, else TCG) against vubd and
# qemu-storage-daemon; puts its table into docs/benchmarks.md.
guest-bench: deps build
	$(CARGO) run --release --example bench -- --only guest $(BENCH_ARGS)

# A Debian package (cargo-deb, installed if missing) with the binary, man pages generated from
# the command line's definition, the systemd units and the docs; checked by scripts/check-deb.sh.
deb:
	command -v cargo-deb >/dev/null 2>&1 || $(CARGO) install cargo-deb --locked
	$(CARGO) run --quiet --example mangen -- target/man
	$(CARGO) deb
	./scripts/check-deb.sh

clean:
	$(CARGO) clean
	rm -rf demo
