"""User entry points: ``python -m jobs.NAME`` (also under ``ray job submit --working-dir . -- python -m jobs.NAME``)."""
