"""Pipeline stages. Each module holds ``run(cfg, data, cache, ...) -> Artifact`` (inputs in, artifact
out, cached through :class:`mllmrec.cache.ArtifactCache`) and a Hydra CLI: ``python -m stages.<name>``."""
