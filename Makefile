# TaskFlow — the commands of the seed's Makefile, on Debian/Ubuntu without Docker.
# `make dev` and `make test` are the two you need; see README.md.

SHELL := /bin/bash
CARGO ?= cargo
DEVSTACK := target/debug/taskflow-devstack
export TASKFLOW_CACHE ?= /var/cache/taskflow

.PHONY: help deps build dev up down restart status logs db-reset add-shard remove-shard test test-rust test-nixos test-systemd lint fmt fmt-check nix-check bench bench-reshard clean

help: ## Show the commands
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

deps: ## Install what is missing (apt when root, else print the command; npm; the broker)
	@scripts/install-deps.sh

build: deps ## Build every crate and binary
	$(CARGO) build --workspace --all-targets

dev: build ## Start the whole stack in the foreground; Ctrl-C stops everything
	$(DEVSTACK) dev

up: build ## Start the stack in the background, return when every daemon is READY
	$(DEVSTACK) up

down: ## Stop the background stack; no process is left behind
	@if [ -x $(DEVSTACK) ]; then $(DEVSTACK) down; else echo "no stack (not built)"; fi

restart: build ## down, then up
	$(DEVSTACK) restart

status: ## Show every service, its port and state
	@$(DEVSTACK) status

logs: ## Follow all logs, prefixed by service
	@$(DEVSTACK) logs

db-reset: ## Delete all databases (stack must be down)
	$(DEVSTACK) db-reset

add-shard: ## Start a fifth PostgreSQL (5437), add it as shard-4, show the move until done
	@if [ -x $(DEVSTACK) ]; then $(DEVSTACK) add-shard; else echo "no stack (not built); make up first"; exit 1; fi

remove-shard: ## Move shard-4's rows back to the other shards, then stop its PostgreSQL
	@if [ -x $(DEVSTACK) ]; then $(DEVSTACK) remove-shard; else echo "no stack (not built); make up first"; exit 1; fi

test: deps ## Lint, every test against real PostgreSQL/Redis/broker/SMTP, the Nix checks, the units under real systemd
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --no-fail-fast
	scripts/check-nix.sh
	tests/nixos-eval/run.sh
	tests/systemd/run.sh

test-nixos: deps ## Evaluate the NixOS module (good and bad configurations), render its units, score their hardening
	$(CARGO) build --workspace --bins
	tests/nixos-eval/run.sh

test-systemd: test-nixos ## Boot a Debian VM and run the module's units under real systemd (tests/systemd)
	tests/systemd/run.sh

bench: deps ## Proxy vs pgbouncer vs direct PostgreSQL, one run (shard-proxy/bench/pgbench.sh; root; DURATION, CLIENTS, REPS)
	shard-proxy/bench/pgbench.sh

bench-reshard: deps ## ADD/REMOVE SHARD under write load: rows/s, write p50/p99 before and during, integrity (shard-proxy/bench/reshard.sh; root; ROWS, LOAD_RATE, THROTTLE)
	shard-proxy/bench/reshard.sh

lint: ## clippy with warnings as errors, and the Nix parse check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	scripts/check-nix.sh

fmt: ## Format the code
	$(CARGO) fmt --all

nix-check: ## Parse every .nix file (nix-instantiate --parse)
	scripts/check-nix.sh

clean: ## Remove build output (not the stack's state)
	$(CARGO) clean
