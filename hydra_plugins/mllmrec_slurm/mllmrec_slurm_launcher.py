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

    @dataclass
    class MllmrecSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.mllmrec_slurm.mllmrec_slurm_launcher.MllmrecSlurmLauncher"
        poll_s: float = 5.0  # seconds between two squeue calls
        end_grace_s: float = 30.0  # after SLURM says a job ended, how long its result file may lag
        controller_timeout_s: float = 300.0  # squeue failing this long ends the wait (one line)
        check_cluster: bool = True  # compare the request with sinfo before submitting

    class MllmrecSlurmLauncher(SlurmLauncher):
        WATCH_KEYS = ("poll_s", "end_grace_s", "controller_timeout_s", "check_cluster")

        def __init__(self, **params) -> None:
            self.watch = {k: params.pop(k) for k in self.WATCH_KEYS if k in params}
            super().__init__(**params)

        def launch(self, job_overrides, initial_job_idx):
            from mllmrec.slurm_launch import Watch, launch

            return launch(self, job_overrides, initial_job_idx, Watch(**self.watch))

    ConfigStore.instance().store(group="hydra/launcher", name="mllmrec_slurm", node=MllmrecSlurmConf(),
                                 provider="mllmrec")
