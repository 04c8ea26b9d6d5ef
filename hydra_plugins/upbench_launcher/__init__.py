"""upbench's Hydra launchers: ``hydra/launcher=slurm`` and ``hydra/launcher=local`` (see :mod:`.launcher`).  They
live in the ``hydra_plugins`` namespace because Hydra only instantiates launchers from there."""
