#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz) with clang, ASan and UBSan, and
# runs each for SECONDS (default 60) on a scratch copy of its seed corpus.
# Prints executions and crashes per target; exits 1 if any target crashed
# (the reproducer is left in $BUILD_DIR/fuzz-out/TARGET/, as crash-*).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]     targets: frame_fuzz messages_fuzz snapshot_fuzz
#
# Env: BUILD_DIR (default build-fuzz), CXX (default clang++-14, else clang++),
#      FUZZ_JOBS (ninja -j, default 2).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(frame_fuzz messages_fuzz snapshot_fuzz)
BUILD_DIR=${BUILD_DIR:-build-fuzz}
# clang and its sanitizer runtime (libFuzzer) come from Debian.
missing=()
for p in clang-14 libclang-rt-14-dev; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' ||
    missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >&2 || exit 1
fi
if [[ -z ${CXX:-} ]]; then
  CXX=clang++-14
  command -v "$CXX" >/dev/null || CXX=clang++
fi

if [[ ! -f $BUILD_DIR/build.ninja ]]; then
  CXX=$CXX meson setup "$BUILD_DIR" -Dfuzz=enabled -Dtests=disabled \
    -Db_lundef=false -Dbuildtype=debugoptimized >&2 || exit 1
fi
# Only the fuzz targets and what they link: not the library or the tools.
ninja -C "$BUILD_DIR" -j "${FUZZ_JOBS:-2}" \
  "${TARGETS[@]/#/tests/fuzz/}" >&2 || exit 1

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export KVMIG_LOG_LEVEL=off
status=0
summary=()
for t in "${TARGETS[@]}"; do
  out=$BUILD_DIR/fuzz-out/$t
  rm -rf "$out"
  mkdir -p "$out/corpus"
  cp -r "tests/fuzz/corpus/$t/." "$out/corpus/" 2>/dev/null || true
  echo "=== $t: ${SECONDS_PER_TARGET}s" >&2
  (cd "$out" && "../../tests/fuzz/$t" -max_total_time="$SECONDS_PER_TARGET" \
      -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 corpus) \
    >"$out/log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/log" | tail -n1)
  crashes=$(find "$out" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' \
    -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
  if ((rc != 0)) && ((crashes == 0)); then crashes=1; fi
  line="$t: ${execs:-?} executions, $crashes crashes, $(find "$out/corpus" -type f | wc -l) corpus files"
  summary+=("$line")
  if ((crashes > 0)); then
    status=1
    grep -m5 -E 'ERROR|SUMMARY|runtime error' "$out/log" >&2
    echo "$t: reproducers in $out (log: $out/log)" >&2
  fi
done
printf '%s\n' "${summary[@]}"
exit $status
