"""Command-line entry points, one per stage: ``python -m stages.<name> [overrides]``, a few lines
each (describe, reason, encode and graph call :func:`mllmrec.pipeline.stage_cli`); the stage logic
is in the library, :mod:`mllmrec.stages`."""
