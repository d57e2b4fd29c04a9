# sparsedisk — see README.md. Every target installs what it needs.
SHELL   := /bin/bash
GO      ?= go
BIN     := bin/sparsedisk
DEMO    ?= demo.img
# Tests run with the race detector; the suite stays well under 20 minutes
# on 2 cores.
TESTFLAGS ?= -race -timeout 25m

.PHONY: all deps build test check bench bench-quick run crashtest fuzz soak clean

all: build

deps:
	@./scripts/deps.sh

build:
	$(GO) build -o $(BIN) ./cmd/sparsedisk

## test: install peers, then every test (unit, model, crash, peers, FUSE) with -race
test: deps
	$(GO) test $(TESTFLAGS) ./... 2>&1 | tee /tmp/sparsedisk-test.log; exit $${PIPESTATUS[0]}

## check: formatting, vet, tidy modules
check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@cp go.mod /tmp/go.mod.check; cp go.sum /tmp/go.sum.check; $(GO) mod tidy; \
	 if ! cmp -s go.mod /tmp/go.mod.check || ! cmp -s go.sum /tmp/go.sum.check; then echo "go mod tidy changed go.mod/go.sum"; exit 1; fi

## bench: end-to-end comparison with peers (writes bench/RESULTS.md, bench/results.png), then the engine micro-benchmarks
bench: deps build
	$(GO) run ./bench/harness -bin $(BIN) -out bench
	$(GO) test -run '^$$' -bench . -benchtime 3x ./blockif/ ./bench/...

## bench-quick: a ~2 minute smoke run of the harness (results in /tmp/sparsedisk-bench-quick)
bench-quick: deps build
	$(GO) run ./bench/harness -quick -bin $(BIN) -out /tmp/sparsedisk-bench-quick

## run: build, create demo.img (20G, split 1G, 4 KiB sectors) if missing, serve it over NBD
run: build
	@[ -e $(DEMO) ] || ./$(BIN) create $(DEMO) size=20G split=1G sectorsize=4096
	./$(BIN) info $(DEMO)
	@if ./$(BIN) serve --help >/dev/null 2>&1; then ./$(BIN) serve $(DEMO); else echo "(the NBD server is not built yet)"; fi

## crashtest: the long crash simulation
crashtest:
	SPARSEDISK_CRASH_ROUNDS=20000 $(GO) test -run 'TestCrash' -v -timeout 60m ./blockif/

## fuzz: each fuzz target for a while
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParseDescriptor -fuzztime 60s ./blockif/
	$(GO) test -run '^$$' -fuzz FuzzOpenLUT -fuzztime 60s ./blockif/

clean:
	rm -rf bin
