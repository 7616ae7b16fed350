"""``python -m stages.describe [overrides]``: run the describe stage (and what it needs); the logic is in
:mod:`mllmrec.stages.describe`."""

from mllmrec.pipeline import stage_cli

if __name__ == "__main__":
    stage_cli("describe")
