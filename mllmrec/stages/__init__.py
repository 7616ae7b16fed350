"""The pipeline stages as a library (SPEC section 1): describe, reason, encode, graph, prepare.

describe, reason, encode and graph each hold a pure ``run(<its own config node(s)>, [data,] cache,
<explicit inputs>) -> Artifact`` (inputs in, artifact out, cached through
:class:`mllmrec.cache.ArtifactCache`) and the loader(s) of what it wrote; prepare's ``run(cfg, name)``
writes a dataset folder and returns its report. A stage reads only its own config node; :func:`mllmrec.pipeline.build_inputs`
is the one place that reads across config groups and wires the stages together. The top-level
``stages`` package holds the ``python -m stages.<name>`` entry points only.
"""
