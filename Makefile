# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; `make test` also installs the
# Debian packages the tests drive (xmlsec1 for pysaml2, chromium, systemd for
# systemd-analyze) when missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := xmlsec1 chromium nginx libnginx-mod-http-headers-more-filter redis-server docker-compose systemd
AXE    := .cache/npm/node_modules/axe-core/axe.min.js

.PHONY: demo test lint system-packages clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sso-gateway demo --dir .demo

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# axe-core (the browser tests' accessibility audit) from the npm registry, kept out of git.
$(AXE):
	npm install --prefix .cache/npm --no-audit --no-fund --silent axe-core@4

test: $(STAMP) system-packages $(AXE)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/python -m pytest -q

# Benchmark against a direct upstream (nginx), Apache's mod_proxy_http and Apache with
# mod_auth_mellon, on loopback;
# prints a table and writes bench/results/latest.json (see docs/performance.md).
BENCH_PACKAGES := wrk apache2 libapache2-mod-auth-mellon nginx libnginx-mod-http-headers-more-filter

bench: $(STAMP)
	@$(MAKE) --no-print-directory system-packages APT_PACKAGES="$(BENCH_PACKAGES)"
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy gateway bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .cache
