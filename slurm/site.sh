# Site settings for the sbatch scripts in slurm/: the one place to adapt to a cluster.
# Sourced at the start of every job (from the submit directory, the repository root).
#
# Partition, account, time limit and GPUs are sbatch options: give them on the command line or
# export them before `sbatch` (sbatch reads SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT,
# SBATCH_GPUS_PER_NODE from the environment), e.g.
#   export SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproject SBATCH_TIMELIMIT=24:00:00

# Environment: modules and the project's virtualenv.
# module load cuda/12.4
source "${GANPIPE_VENV:-.venv}/bin/activate"

# Processes per node: GPUs per node on GPU nodes (1 on CPU-only test clusters).
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# Rendezvous port on the first node of the job.
MASTER_PORT=${MASTER_PORT:-29500}
# Seconds the other nodes wait before launching, so the first node binds the rendezvous port
# first. Only needed when several "nodes" share one host (the test cluster); 0 on real clusters.
RDZV_STAGGER_S=${RDZV_STAGGER_S:-0}
# CPU threads per process.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# NCCL over the right interface, if the cluster needs it:
# export NCCL_SOCKET_IFNAME=ib0
