#!/usr/bin/env bash
# Train VPiT across the nodes of a SLURM allocation: one `srun` task per node starts `torchrun`,
# which starts one rank per GPU; the ranks of all nodes meet at a c10d rendezvous on the first
# node, named from SLURM_* (no hostfile, no ssh).
#
#   sbatch infra/slurm/train.sh configs/stage2.yaml --resume
#   sbatch --nodes=8 infra/slurm/train.sh configs/stage2.yaml --resume   # more nodes, same global batch:
#                                          # lower grad_accum in the config so that the product stays
#
# Pre-emption: `--signal=B:USR1@300` has SLURM send SIGUSR1 five minutes before the time limit;
# srun passes it to torchrun, torchrun (told to handle SIGUSR1, and to wait 15 minutes before a
# SIGKILL) to every rank, and the trainer checkpoints at the next step boundary and exits 0. `--requeue` then restarts the job, and `--resume` continues it (on
# any number of nodes: a world-size change goes through a universal checkpoint by itself).
#
# Set VPIT_VENV to the virtual environment with vpit installed (shared by all nodes); the run's
# output_dir must be on a folder every node sees.
#SBATCH --job-name=vpit-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=vpit-train-%j.out

set -euo pipefail

CONFIG=${1:?usage: sbatch infra/slurm/train.sh CONFIG.yaml [vpit train args, e.g. --resume]}
shift
VPIT_VENV=${VPIT_VENV:?set VPIT_VENV to the virtual environment with vpit installed}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
# shellcheck disable=SC1091
source "$VPIT_VENV/bin/activate"
# PYTHONSAFEPATH: `python -m vpit` on each rank never puts the working directory on sys.path.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
echo "vpit-train: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous $MASTER:$MASTER_PORT, config $CONFIG"

cd "${SLURM_SUBMIT_DIR:-$PWD}"
# The batch shell gets SIGUSR1 (B:); pass it on to the srun step, which signals its tasks.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 900 \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m vpit train "$CONFIG" "$@" &
STEP=$!
trap 'kill -USR1 $STEP' USR1
trap 'kill -TERM $STEP' TERM
# `wait` returns early when a trapped signal arrives: then wait again, for the checkpoint.
set +e
wait $STEP
rc=$?
while [ $rc -gt 128 ] && kill -0 $STEP 2>/dev/null; do
    wait $STEP
    rc=$?
done
exit $rc
