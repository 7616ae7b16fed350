"""hydra-submitit-launcher's SLURM launcher with mllmrec's cluster check and wait
(:mod:`mllmrec.slurm_launch`). A Hydra launcher must live in the ``hydra_plugins`` package;
this module only registers the config ``hydra/launcher=mllmrec_slurm`` (the submitit keys plus
the watch keys below) and hands ``launch`` over. Without the ``launchers`` extra it registers
nothing (Hydra imports every plugin module at start-up, so it must not fail then)."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

try:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # pip install "mllmrec[launchers]"
    SlurmLauncher = None

if SlurmLauncher is not None:

    from mllmrec.slurm_launch import Watch  # light: no torch

    @dataclass
    class MllmrecSlurmConf(SlurmQueueConf):
        """submitit's SLURM keys plus how mllmrec watches the array (the fields of ``Watch``)."""

        _target_: str = "hydra_plugins.mllmrec_slurm.mllmrec_slurm_launcher.MllmrecSlurmLauncher"
        poll_s: float = Watch.poll_s
        end_grace_s: float = Watch.end_grace_s
        controller_timeout_s: float = Watch.controller_timeout_s
        check_cluster: bool = Watch.check_cluster

    class MllmrecSlurmLauncher(SlurmLauncher):
        def __init__(self, **params) -> None:
            self.watch = {k: params.pop(k) for k in Watch.__dataclass_fields__ if k in params}
            super().__init__(**params)

        def launch(self, job_overrides, initial_job_idx):
            from mllmrec.slurm_launch import launch

            return launch(self, job_overrides, initial_job_idx, Watch(**self.watch))

    ConfigStore.instance().store(group="hydra/launcher", name="mllmrec_slurm", node=MllmrecSlurmConf(),
                                 provider="mllmrec")
