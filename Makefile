# `make run`: the service with the embedded defaults (SQLite, SQLite queue, in-process consumer).
# `make test`: the test suite (SQLite; set DATABASE_URL=postgresql://... for PostgreSQL).
VENV ?= .venv
PYTHON ?= python3

run: $(VENV)/.installed
	$(VENV)/bin/python app.py

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

.PHONY: run test
