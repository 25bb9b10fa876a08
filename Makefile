# The two commands of the README:
#   make run    install and start the panel on the embedded defaults (SQLite, ORM broker)
#   make test   install what the tests need and run the whole suite (default, then PostgreSQL + Redis)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_TEST_PACKAGES := nix-bin openssh-server openssh-client iproute2 git chromium sqlite3 procps psmisc perl postgresql redis-server
APT_RUN_PACKAGES := git openssh-client
DATABASE_URL_PG ?= postgres://postgres@127.0.0.1:5432/panel
REDIS_URL_TEST ?= redis://127.0.0.1:6379/0

.PHONY: run test test-default test-scaleout venv venv-dev apt-run apt-test services bench lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt

venv-dev: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt

apt-run:
	@./tests/apt-install.sh $(APT_RUN_PACKAGES)

apt-test:
	@./tests/apt-install.sh $(APT_TEST_PACKAGES)

run: apt-run venv
	$(BIN)/python manage.py runpanel

services:
	@./tests/services.sh

test: apt-test venv-dev services lint test-default test-scaleout

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PANEL_DATA_DIR=$$(mktemp -d) $(BIN)/python manage.py check
	PANEL_DATA_DIR=$$(mktemp -d) $(BIN)/python manage.py makemigrations --check --dry-run

# Everything, on the embedded default (SQLite, ORM broker, in-memory channel layer).
test-default:
	$(BIN)/pytest -q

# Everything again on PostgreSQL + Redis (channels-redis, django-q2 Redis broker): the audit triggers,
# chain function and search indexes differ per database, so no test is SQLite-only by accident.
test-scaleout:
	DATABASE_URL=$(DATABASE_URL_PG) REDIS_URL=$(REDIS_URL_TEST) $(BIN)/pytest -q

bench: venv-dev apt-test
	$(BIN)/python bench/run.py
