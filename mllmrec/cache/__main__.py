from mllmrec.cache.cli import entry

entry()
