# flashtier: one build, no configure step.
#
#   make                 build build/flashtierd
#   make run             install missing packages, build, run the built-in demo
#   make check           unit, integration and interop tests
#   make check SANITIZE=1  the same under ASan+UBSan (separate build tree)
#   make check TSAN=1      the same under ThreadSanitizer (separate build tree)
#   make bench           pass-through benchmark (tests/bench), not part of check
#   make bench-cache     read-cache benchmark against nbdkit's cache filter
#   make bench-writeback write-back benchmark against the cache device and nbdkit's cache filter
#   make soak            long crash tests: power cuts and kill -9 under fio
#   make install         PREFIX=/usr/local DESTDIR=

PREFIX  ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin
DATADIR ?= $(PREFIX)/share
MANDIR  ?= $(DATADIR)/man
UNITDIR ?= $(PREFIX)/lib/systemd/system

PKGS := liburing libnbd jansson libmicrohttpd
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

CC      ?= cc
WARN    := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
           -Wno-missing-field-initializers
CFLAGS  ?= -O2 -g
CFLAGS  += -std=gnu11 $(WARN) -D_GNU_SOURCE -Iinclude $(PKG_CFLAGS) -pthread -MMD -MP
LDLIBS  += $(PKG_LIBS) -pthread

ifeq ($(SANITIZE),1)
BUILD   ?= build/sanitize
CFLAGS  += -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
LDFLAGS += -fsanitize=address,undefined
else ifeq ($(TSAN),1)
BUILD   ?= build/tsan
CFLAGS  += -O1 -fsanitize=thread -fno-omit-frame-pointer
LDFLAGS += -fsanitize=thread
else
BUILD   ?= build
endif

LIB_SRCS := $(wildcard agent/*.c agent/*/*.c cache/*.c cache/*/*.c replication/*.c replication/*/*.c)
LIB_SRCS := $(filter-out agent/main.c,$(LIB_SRCS))
LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/%.o)
LIB      := $(BUILD)/libflashtier.a
AGENT    := $(BUILD)/flashtierd

UNIT_SRCS := $(wildcard tests/unit/*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/unit/%)
INTEG_SRCS := $(wildcard tests/integration/*.c)
INTEG_BINS := $(INTEG_SRCS:tests/integration/%.c=$(BUILD)/tests/integration/%)
TEST_LIBS := -lcriterion

.PHONY: all run check test-programs bench-cache bench-writeback soak check-unit check-integration bench cachesim install uninstall clean format deps

all: $(AGENT)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(LIB): $(LIB_OBJS)
	@mkdir -p $(dir $@)
	$(AR) rcs $@ $^

$(AGENT): $(BUILD)/agent/main.o $(LIB)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/unit/%: tests/unit/%.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS) $(TEST_LIBS)

$(BUILD)/tests/integration/%: tests/integration/%.c tests/integration/harness.h $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS) $(TEST_LIBS)

deps:
	@./contrib/install-deps.sh

run: deps
	@$(MAKE) --no-print-directory all
	exec ./$(AGENT)

ifeq ($(TSAN),1)
# ThreadSanitizer instruments the agent, where the threads are; the test
# programs (Criterion cannot run under TSan) come from an uninstrumented tree.
check: $(AGENT)
	@$(MAKE) --no-print-directory TSAN= BUILD=build/tsan-tests test-programs
	@BUILD=build/tsan-tests AGENT=$(abspath $(AGENT)) tests/run-tests.sh
else
check: $(AGENT) $(UNIT_BINS) $(INTEG_BINS)
	@BUILD=$(BUILD) AGENT=$(abspath $(AGENT)) tests/run-tests.sh
endif

test-programs: $(UNIT_BINS) $(INTEG_BINS)

bench: $(AGENT)
	AGENT=$(abspath $(AGENT)) tests/bench/nbd-passthrough.sh

# Read cache against nbdkit's cache filter and the SAN direct (1 ms SAN).
bench-cache: $(AGENT)
	AGENT=$(abspath $(AGENT)) tests/bench/cache-read.sh

# Write-back against the cache device's own O_DIRECT writes and nbdkit's
# cache filter (cache=writeback), 1 ms SAN; data-loss check under reclaim.
bench-writeback: $(AGENT)
	AGENT=$(abspath $(AGENT)) tests/bench/write-back.sh

# The crash tests at length: 20000 power-cut points, then kill -9 under fio.
soak: $(AGENT) $(BUILD)/tests/integration/test_writeback_powercut
	FT_SOAK=1 AGENT=$(abspath $(AGENT)) $(BUILD)/tests/integration/test_writeback_powercut --jobs=2 --timeout 0
	FT_SOAK=1 AGENT=$(abspath $(AGENT)) sh tests/integration/interop-writeback-fio.sh

# Replacement-policy simulator: links the agent's own cache directory.
CACHESIM_SRCS := $(wildcard tests/bench/cachesim/*.c)
$(BUILD)/cachesim: $(CACHESIM_SRCS) $(wildcard tests/bench/cachesim/*.h) $(LIB)
	$(CC) $(filter-out -MMD -MP,$(CFLAGS)) $(LDFLAGS) -o $@ $(CACHESIM_SRCS) $(LIB) $(LDLIBS) -lm

cachesim: $(BUILD)/cachesim
	./$(BUILD)/cachesim

install: $(AGENT)
	install -D -m 0755 $(AGENT) $(DESTDIR)$(SBINDIR)/flashtierd
	install -D -m 0644 contrib/flashtierd.example.json $(DESTDIR)$(DATADIR)/flashtier/flashtierd.example.json
	@mkdir -p $(DESTDIR)$(UNITDIR)
	sed 's|/usr/local/sbin|$(SBINDIR)|g' contrib/flashtierd.service > $(DESTDIR)$(UNITDIR)/flashtierd.service
	install -D -m 0644 contrib/flashtierd.8 $(DESTDIR)$(MANDIR)/man8/flashtierd.8

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/flashtierd $(DESTDIR)$(MANDIR)/man8/flashtierd.8 \
		$(DESTDIR)$(UNITDIR)/flashtierd.service
	rm -rf $(DESTDIR)$(DATADIR)/flashtier

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf build

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
