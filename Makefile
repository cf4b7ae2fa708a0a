# Entry points; README.md documents them.
.PHONY: test build run
test:
	scripts/test-all
build:
	cargo build --release --workspace
run:
	cargo run --release -p lockstep-agent -- run --guest kvstore --disk kvstore.img --record kvstore.log
