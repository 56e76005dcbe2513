# One-command entry points. Each target creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck protos bench bench-vs clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,codegen,kv]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python examples/kvnode.py demo

test: $(BIN)/.installed
	$(BIN)/ruff check trio_raft trio_raft_kv tests bench examples
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(BIN)/.installed
	$(BIN)/ruff check trio_raft trio_raft_kv tests bench examples

typecheck: $(BIN)/.installed
	$(BIN)/mypy

# Regenerate the betterproto2/grpclib code from protos/: the transport under
# trio_raft/transport/_proto, the KV service under trio_raft_kv/_proto.
protos: $(BIN)/.installed
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_betterproto2_out=trio_raft/transport/_proto \
	  --python_betterproto2_opt=client_generation=async,server_generation=async \
	  protos/transport.proto
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_betterproto2_out=trio_raft_kv/_proto \
	  --python_betterproto2_opt=client_generation=async,server_generation=async \
	  protos/kv.proto

bench: $(BIN)/.installed
	$(BIN)/python bench/core_bench.py

# Side by side with PySyncObj (installs it into its own venv under the temp dir).
bench-vs: $(BIN)/.installed
	$(BIN)/python bench/vs_pysyncobj.py
	$(BIN)/python bench/engines_vs_pysyncobj.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
