#!/usr/bin/env bash
# Run vubd's cargo-fuzz targets (fuzz/fuzz_targets) one after another, SECONDS each, and print
# one line per target from libFuzzer's final statistics.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 600 s, every target
#
# Installs cargo-fuzz (cargo install) if it is missing. Uses the nightly toolchain with
# AddressSanitizer when rustup has one; otherwise the stable toolchain with RUSTC_BOOTSTRAP=1
# and no sanitizer (coverage-guided all the same; panics, aborts, hangs and the memory limit
# are still caught).
#
# Corpus: fuzz/corpus/TARGET (grows, gitignored), plus the committed seeds in fuzz/seeds/TARGET
# and the inputs that once crashed in fuzz/regressions/TARGET.
# Crashes: fuzz/artifacts/TARGET/ (gitignored). Logs: fuzz/logs/TARGET.log (gitignored).
# Exit status: non-zero if a target failed to build or found a crash, a leak, a timeout or an
# out-of-memory (every target still runs).
set -uo pipefail

# The whole script is one function, read before it runs: editing the file meanwhile is safe.
main() {
    cd "$(dirname "$0")/.."
    root=$(pwd)
    local seconds=${1:-600}
    shift || true

    if [ -z "${CARGO_FUZZ_TOOLCHAIN+x}" ]; then
        if command -v rustup >/dev/null && rustup run nightly rustc --version >/dev/null 2>&1; then
            CARGO_FUZZ_TOOLCHAIN=nightly
        else
            CARGO_FUZZ_TOOLCHAIN=stable
        fi
    fi
    if [ "$CARGO_FUZZ_TOOLCHAIN" = nightly ]; then
        fuzz=(cargo +nightly fuzz)
        build_opts=()
    else
        # cargo-fuzz needs unstable rustc flags; without nightly, unlock them on stable and leave
        # out the sanitizer (which needs a nightly standard library). Its own target directory,
        # so that it never mixes with the sanitizer build.
        export RUSTC_BOOTSTRAP=1
        fuzz=(cargo fuzz)
        build_opts=(--sanitizer none --target-dir fuzz/target-stable)
    fi

    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "fuzz: installing cargo-fuzz"
        cargo install cargo-fuzz --locked || exit 1
    fi

    targets=("$@")
    if [ ${#targets[@]} -eq 0 ]; then
        mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir fuzz)
    fi

    echo "fuzz: building ${targets[*]} ($CARGO_FUZZ_TOOLCHAIN toolchain)"
    if ! "${fuzz[@]}" build --fuzz-dir fuzz "${build_opts[@]}"; then
        echo "fuzz: the targets do not build" >&2
        exit 1
    fi

    mkdir -p fuzz/logs
    failed=()
    for t in "${targets[@]}"; do
        mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
        dirs=("fuzz/corpus/$t")
        # Seeds, and inputs that once crashed (each run starts by replaying them).
        for d in "fuzz/seeds/$t" "fuzz/regressions/$t"; do
            [ -d "$d" ] && dirs+=("$d")
        done
        args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
        [ -f "fuzz/dicts/$t.dict" ] && args+=(-dict="fuzz/dicts/$t.dict")
        log="fuzz/logs/$t.log"
        start=$(date +%s)
        "${fuzz[@]}" run --fuzz-dir fuzz "${build_opts[@]}" "$t" "${dirs[@]}" -- "${args[@]}" \
            >"$log" 2>&1
        status=$?
        elapsed=$(($(date +%s) - start))
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
        speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
        rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n1)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)
        ft=$(grep -o 'ft: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)
        corpus=$(grep -o 'corp: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)
        if [ "$status" -eq 0 ]; then
            result=ok
        else
            result="FAILED (exit $status; see $log and fuzz/artifacts/$t/)"
            failed+=("$t")
        fi
        printf 'fuzz: %-18s runs %s (%s/s), coverage %s, features %s, corpus %s, peak rss %s MB, %ss: %s\n' \
            "$t" "${runs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "${corpus:-?}" "${rss:-?}" \
            "$elapsed" "$result"
    done

    # Scratch directories of target processes that crashed (the others remove their own).
    for d in /dev/shm/vubd-fuzz-* "${TMPDIR:-/tmp}"/vubd-fuzz-*; do
        [ -d "$d" ] || continue
        pid=${d##*-}
        [ -d "/proc/$pid" ] || rm -rf "$d"
    done

    if [ ${#failed[@]} -gt 0 ]; then
        echo "fuzz: failed: ${failed[*]} (minimize with: cargo +nightly fuzz tmin TARGET ARTIFACT)" >&2
        return 1
    fi
}

main "$@"
