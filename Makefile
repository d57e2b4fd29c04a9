# sparsedisk — see README.md. Every target installs what it needs.
SHELL   := /bin/bash
GO      ?= go
BIN     := bin/sparsedisk
DEMO    ?= demo.img
# Tests run with the race detector; the suite stays well under 20 minutes
# on 2 cores.
TESTFLAGS ?= -race -timeout 25m
# Each fuzz target runs this long at the end of `make test`; `make fuzz`
# runs them for FUZZTIME each.
CI_FUZZTIME ?= 8s
FUZZTIME    ?= 60s

.PHONY: all deps build test check bench bench-quick run crashtest fuzz soak clean

all: build

deps:
	@./scripts/deps.sh

build:
	$(GO) build -o $(BIN) ./cmd/sparsedisk

## test: install peers, then every test (unit, model, crash, peers, FUSE) with -race
test: deps
	@echo "# run: $(GO) test $(TESTFLAGS) ./..., $$(date -u +%FT%TZ), commit $$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > /tmp/sparsedisk-test.log
	$(GO) test $(TESTFLAGS) ./... 2>&1 | tee -a /tmp/sparsedisk-test.log; exit $${PIPESTATUS[0]}
	@FUZZTIME=$(CI_FUZZTIME) ./scripts/fuzz.sh

## check: formatting, vet, tidy modules
check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@cp go.mod /tmp/go.mod.check; cp go.sum /tmp/go.sum.check; $(GO) mod tidy; \
	 if ! cmp -s go.mod /tmp/go.mod.check || ! cmp -s go.sum /tmp/go.sum.check; then echo "go mod tidy changed go.mod/go.sum"; exit 1; fi

## bench: end-to-end comparison with peers (writes bench/RESULTS.md, bench/results.png), then the engine micro-benchmarks
bench: build
	@./scripts/deps.sh bench
	$(GO) run ./bench/harness -bin $(BIN) -out bench
	$(GO) test -run '^$$' -bench . -benchtime 3x ./blockif/ ./bench/...

## bench-quick: a smoke run of the harness (a few minutes) (results in /tmp/sparsedisk-bench-quick)
bench-quick: build
	@./scripts/deps.sh bench
	$(GO) run ./bench/harness -quick -bin $(BIN) -out /tmp/sparsedisk-bench-quick

## run: build, create demo.img (20G, split 1G, 4 KiB sectors) if missing, serve it over NBD
run: build
	@[ -e $(DEMO) ] || ./$(BIN) create $(DEMO) size=20G split=1G sectorsize=4096
	./$(BIN) info $(DEMO)
	./$(BIN) serve $(DEMO)

## crashtest: the long crash simulation (engine, 20000 rounds) and the process-kill harness (50 rounds over NBD and FUSE)
crashtest: deps
	@echo "# run: make crashtest, $$(date -u +%FT%TZ), commit $$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > /tmp/sparsedisk-crashtest.log
	SPARSEDISK_CRASH_ROUNDS=20000 $(GO) test -run 'TestCrash' -v -timeout 60m ./blockif/ 2>&1 | tee -a /tmp/sparsedisk-crashtest.log; exit $${PIPESTATUS[0]}
	SPARSEDISK_KILL_ROUNDS=50 $(GO) test -run 'TestKillCrash' -v -timeout 60m ./cmd/sparsedisk/ 2>&1 | tee -a /tmp/sparsedisk-crashtest.log; exit $${PIPESTATUS[0]}
	@echo "figures for TESTING.md: scripts/testing-figures.sh /tmp/sparsedisk-crashtest.log --update TESTING.md"

## soak: 16 connections of verified mixed I/O for 60 s against `sparsedisk serve` (a 10 s version runs in make test)
soak: deps
	SPARSEDISK_SOAK=60s $(GO) test -run 'TestSoak' -v -timeout 30m ./cmd/sparsedisk/

## fuzz: each fuzz target for FUZZTIME (a short run ends make test)
fuzz:
	@FUZZTIME=$(FUZZTIME) ./scripts/fuzz.sh

clean:
	rm -rf bin
