from samdiffsr.cli import run

run()
