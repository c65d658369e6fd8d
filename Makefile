# mc-proxy — developer entry points. `make help` lists them.
CARGO ?= cargo

.PHONY: all mc-proxy devserver test lint fmt bench help
.PHONY: soak fuzz-replay fuzz-build

all: lint test mc-proxy ## lint, test, release build

mc-proxy: ## release build: target/release/mc-proxy
	$(CARGO) build --release --locked

devserver: ## run mc-proxy locally on 127.0.0.1:8443 with a demo backend (creates ./srv/)
	$(CARGO) build --locked
	./scripts/devserver.sh

test: ## every test of the workspace: unit (mc-proxy and crates/wire), integration (real binary on loopback), fuzz corpus replay
	$(CARGO) test --locked --workspace --lib --bins --tests -- --test-threads=2

lint: ## rustfmt check, clippy and rustdoc (broken intra-doc links) with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS='-D warnings' $(CARGO) doc --locked --workspace --no-deps

fmt:
	$(CARGO) fmt --all

# Criterion flags, e.g. BENCH_ARGS='--measurement-time 2 --warm-up-time 1'.
BENCH_ARGS ?=
# End-to-end tool flags, e.g. E2E_ARGS='--phases idle --idle 100,1000,9900'.
E2E_ARGS ?=

bench: ## micro-benchmarks (hello, routes, firewall, edge) and the loopback end-to-end run through target/release/mc-proxy
	$(CARGO) bench --locked --bench hello --bench routes --bench firewall --bench edge -- $(BENCH_ARGS)
	$(CARGO) build --release --locked
	$(CARGO) run --release --locked --example mc-proxy-bench -- --bin target/release/mc-proxy $(E2E_ARGS)

SOAK_SECS ?= 600
soak: ## 10-minute soak (SOAK_SECS=600): mixed traffic + admin churn on a release build; prints the figures
	SOAK_SECS=$(SOAK_SECS) $(CARGO) test --locked --release --test soak -- --ignored --nocapture

fuzz-replay: ## replay the committed fuzz corpora through the parsers (stable; also part of make test)
	$(CARGO) test --locked --test fuzz_corpus

fuzz-build: ## build the cargo-fuzz targets (needs a nightly toolchain and cargo-fuzz; the config target builds the whole mc-proxy crate)
	cd fuzz && $(CARGO) +nightly fuzz build -O

help:
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

include mk/packaging.mk
