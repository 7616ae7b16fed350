"""Hydra plugin: ``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml), see mllmrec.slurm_launch."""
