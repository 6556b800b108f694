#!/usr/bin/env bash
# Run a vpit mixture grid on a SLURM allocation: start a Ray cluster across the allocated
# nodes (the head on the first, one worker per other node), run `vpit grid run` against it,
# and stop Ray when the grid ends or the job is cancelled.
#
#   sbatch infra/slurm/ray_grid.sh /data/grids/understanding_x_generation.yaml
#   sbatch --nodes=8 infra/slurm/ray_grid.sh GRID.yaml      # more nodes: more cells at once
#
# Each grid cell asks Ray for the GPUs it trains on (the grid spec says how many) and launches
# the DeepSpeed trainer there; finished cells are skipped when the script is re-submitted.
# Set VPIT_VENV to the virtual environment with vpit installed (shared by all nodes).
#SBATCH --job-name=vpit-grid
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=vpit-grid-%j.out

set -euo pipefail

GRID=${1:?usage: sbatch infra/slurm/ray_grid.sh GRID.yaml [extra vpit grid run args]}
shift
VPIT_VENV=${VPIT_VENV:?set VPIT_VENV to the virtual environment with vpit installed}
RAY_PORT=${RAY_PORT:-6379}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-64}

# shellcheck disable=SC1091
source "$VPIT_VENV/bin/activate"
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
# The head's address as the other nodes reach it (the first IPv4 of its interfaces).
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk '{print $1}')
ADDRESS="$HEAD_IP:$RAY_PORT"
echo "vpit-grid: ${#NODES[@]} nodes, Ray head $HEAD ($ADDRESS), grid $GRID"

cleanup() {
    echo "vpit-grid: stopping Ray on every node"
    srun --overlap --nodes="${#NODES[@]}" --ntasks="${#NODES[@]}" ray stop --force >/dev/null 2>&1 || true
}
trap cleanup EXIT

# `ray start --block` keeps each srun step alive for as long as its Ray node runs.
srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" \
    ray start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \
    --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --include-dashboard=false --block &
sleep 15

for node in "${NODES[@]:1}"; do
    srun --overlap --nodes=1 --ntasks=1 -w "$node" \
        ray start --address="$ADDRESS" --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --block &
done

# Wait until every node has joined (or give up after 5 minutes).
expected=${#NODES[@]}
for _ in $(seq 60); do
    joined=$(python - "$ADDRESS" <<'PY'
import sys

import ray

ray.init(address=sys.argv[1], logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
)
    if [ "$joined" -ge "$expected" ]; then
        break
    fi
    sleep 5
done
echo "vpit-grid: $joined of $expected Ray nodes up"
if [ "$joined" -lt "$expected" ]; then
    echo "vpit-grid: not every node joined the Ray cluster; see the srun logs above" >&2
    exit 1
fi

vpit grid run "$GRID" --ray-address "$ADDRESS" "$@"
vpit grid report "$GRID"
