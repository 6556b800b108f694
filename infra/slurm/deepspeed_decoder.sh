#!/usr/bin/env bash
# Train the diffusion decoder (or, with another command, anything vpit launches with DeepSpeed)
# across the nodes of a SLURM allocation: write a DeepSpeed hostfile from the allocation and
# start the `deepspeed` launcher on the first node, which reaches the others over ssh (pdsh).
#
#   sbatch infra/slurm/deepspeed_decoder.sh /data/datasets/metaclip --cache FINGERPRINT \
#       --output /data/decoders/sd15 --config decoder_sd15.yaml
#
# Set VPIT_VENV to the shared virtual environment with vpit installed. Under the launcher the
# decoder trains through DeepSpeed with vpit's bf16 ZeRO-3 config unless --deepspeed names another.
#SBATCH --job-name=vpit-decoder
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=vpit-decoder-%j.out

set -euo pipefail

WORKDIR=${SLURM_SUBMIT_DIR:-$PWD}
VPIT_VENV=${VPIT_VENV:?set VPIT_VENV to the virtual environment with vpit installed}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
# shellcheck disable=SC1091
source "$VPIT_VENV/bin/activate"
# PYTHONSAFEPATH: `python -m vpit` on each rank never puts the working directory on sys.path.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1

HOSTFILE="$WORKDIR/hostfile-$SLURM_JOB_ID"
scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v g="$GPUS_PER_NODE" '{print $1 " slots=" g}' > "$HOSTFILE"
MASTER=$(head -n 1 "$HOSTFILE" | awk '{print $1}')
MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
# The launcher forwards the variables listed in .deepspeed_env to every rank.
printf 'HF_HUB_OFFLINE=1\nTOKENIZERS_PARALLELISM=false\nPYTHONSAFEPATH=1\nPATH=%s\n' "$PATH" > "$WORKDIR/.deepspeed_env"

cd "$WORKDIR"
deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER" --master_port "$MASTER_PORT" \
    --module vpit decoder train "$@"
