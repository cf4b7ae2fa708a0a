#!/bin/sh
# Builds the example for WASI (kv.wasm) and for this host (kv-native), from source, with the Go
# toolchain alone: no module downloads (the program uses only the standard library).
set -eu
cd "$(dirname "$0")"
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod
OUT=${OUT:-.}
GOOS=wasip1 GOARCH=wasm "$GO" build -trimpath -o "$OUT/kv.wasm" .
"$GO" build -trimpath -o "$OUT/kv-native" .
