# gridlet: `make demo` runs the whole system on simulated devices; `make test` runs every test.
# Both set up what is missing on a fresh Debian / Raspberry Pi OS machine first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gridlet-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BUILD_REQS := "setuptools>=69" wheel "Cython>=3.3,<3.4" "grpcio-tools>=1.85,<1.86"
# Sources whose change needs a rebuild of the extension or of the generated protobuf code.
WEBUI_VENDOR := webui/static/vendor/uPlot.iife.min.js
BUILD_INPUTS := pyproject.toml setup.py predictor_ext/_codec.py predictor_ext/_codec.pxd $(wildcard proto/*.proto)

.PHONY: all setup sysdeps testdeps test lint typecheck pytest bench bench-codec bench-edge bench-dashboard bench-sync demo clean

all: test

# System packages: a C compiler for the Cython extension (python3-dev is already there), the
# MQTT broker the tests and the demo start, and npm for the dashboard's chart library.
sysdeps:
	@missing=""; \
	command -v cc >/dev/null 2>&1 || missing="$$missing gcc libc6-dev"; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The browser the dashboard tests drive (Debian's, never a downloaded one) and the PostgreSQL
# server the hub's storage tests start in a temporary folder of their own.
testdeps: sysdeps
	@missing=""; \
	[ -x /usr/lib/chromium/chromium ] || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# uPlot from npm, copied into the package's static files (a LAN with no internet has no CDN).
$(WEBUI_VENDOR): webui/package.json webui/package-lock.json | sysdeps
	cd webui && npm ci --no-audit --no-fund --loglevel=error
	mkdir -p webui/static/vendor
	cp webui/node_modules/uplot/dist/uPlot.iife.min.js webui/node_modules/uplot/dist/uPlot.min.css webui/static/vendor/

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(BUILD_INPUTS) $(WEBUI_VENDOR) | sysdeps
	$(BIN)/python -m pip install -q --upgrade pip $(BUILD_REQS)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	@touch $@

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) testdeps
	$(BIN)/pytest

test: lint typecheck pytest

bench: bench-codec bench-edge bench-dashboard bench-sync

bench-dashboard: $(STAMP) testdeps
	$(BIN)/python -m bench.dashboard

# Hubs on SQLite and on a PostgreSQL server of its own (testdeps installs it), edges syncing.
bench-sync: $(STAMP) testdeps
	$(BIN)/python -m bench.sync

bench-edge: $(STAMP)
	$(BIN)/python -m bench.edge

bench-codec: $(STAMP)
	$(BIN)/python -m bench.codec --csv ../shared/data/uci_household_power_1min.csv --time-column Date,Time \
	  --tol Global_active_power=0.01 --tol Global_reactive_power=0.01 --tol Voltage=0.5 \
	  --tol Global_intensity=0.2 --tol Sub_metering_1=0.5 --tol Sub_metering_2=0.5 --tol Sub_metering_3=0.5 \
	  --window 60 --window 600
	$(BIN)/python -m bench.codec --csv ../shared/data/nrel_serf_west_pv_1min.csv --time-column measured_on \
	  --tol ac_current__779=0.2 --tol ac_power_1__788=10 --tol ac_power_2__789=10 --tol ac_power__773=10 \
	  --tol ac_volts__778=0.5 --tol ambient_temp__780=0.1 --tol das_battery_voltage__790=0.5 \
	  --tol das_temperature__785=0.1 --tol dc_neg_current__777=0.1 --tol dc_neg_voltage__776=0.5 \
	  --tol dc_pos_current__775=0.1 --tol dc_pos_voltage__774=0.5 --tol dc_power_1__786=10 \
	  --tol dc_power_2__787=10 --tol dc_power__772=10 --tol inverter_temp_2__791=0.1 \
	  --tol inveter_temp__784=0.1 --tol module_temp_1__781=0.1 --tol module_temp_2__782=0.1 \
	  --tol module_temp_3__783=0.1 --tol poa_irradiance__771=5 \
	  --window 60 --window 600
	# Sparse and steady: the kitchen sub-meter alone (0 Wh in 95% of the minutes), Unix seconds.
	$(BIN)/python -m bench.sparse_csv --source ../shared/data/uci_household_power_1min.csv \
	  --column Sub_metering_1 --out build/bench/uci_sub_metering_1_unix_s.csv
	$(BIN)/python -m bench.codec --csv build/bench/uci_sub_metering_1_unix_s.csv --time-column unix_s \
	  --time-unit s --tol Sub_metering_1=0.5 --window 60 --window 600

demo: $(STAMP)
	$(BIN)/gridlet demo

clean:
	rm -rf $(VENV) build *.egg-info predictor_ext/*.so predictor_ext/*.c proto/*_pb2.py proto/*_pb2.pyi \
	  webui/node_modules webui/static/vendor
