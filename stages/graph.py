"""``python -m stages.graph [overrides]``: run the graph stage (and what it needs); the logic is in
:mod:`mllmrec.stages.graph`."""

from mllmrec.pipeline import stage_cli

if __name__ == "__main__":
    stage_cli("graph")
