"""SLURM cluster presets (``slurm/cluster/*.yaml``, chosen with ``cluster=<name>``) and ``local-cluster.sh``, a
single-node SLURM for trying the cluster path on one machine."""
