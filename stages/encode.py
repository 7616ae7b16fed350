"""``python -m stages.encode [overrides]``: run the encode stage (and what it needs); the logic is in
:mod:`mllmrec.stages.encode`."""

from mllmrec.pipeline import stage_cli

if __name__ == "__main__":
    stage_cli("encode")
