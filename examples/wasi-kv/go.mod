module lockstep.dev/examples/wasi-kv

go 1.26
