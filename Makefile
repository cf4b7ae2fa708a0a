# Entry points; README.md documents them.
.PHONY: test build run up
test:
	scripts/test-all
build:
	cargo build --release --workspace
up:
	cargo run --release -p lockstep-agent -- up $(ARGS)
run:
	cargo run --release -p lockstep-agent -- run --guest kvstore --disk kvstore.img --record kvstore.log
