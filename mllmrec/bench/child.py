"""Child process of :mod:`mllmrec.bench`: ``python -m mllmrec.bench.child <piece> '<json kwargs>'``."""

import json
import logging
import sys

from mllmrec.bench.pieces import PIECES
from mllmrec.bench.profile import piece_profile_step

PIECES = {**PIECES, "profile_step": piece_profile_step}

if __name__ == "__main__":
    logging.disable(logging.WARNING)
    result = PIECES[sys.argv[1]](**json.loads(sys.argv[2]))
    print(json.dumps(result))
