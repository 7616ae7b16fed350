"""``python -m stages.reason [overrides]``: run the reason stage (and what it needs); the logic is in
:mod:`mllmrec.stages.reason`."""

from mllmrec.pipeline import stage_cli

if __name__ == "__main__":
    stage_cli("reason")
