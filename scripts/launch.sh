#!/usr/bin/env bash
# Launch finetune on several processes with one of the shipped accelerate configs.
#
#   scripts/launch.sh MODE NUM_PROCESSES [finetune overrides...]
#
#   MODE: cpu        N processes on this machine's CPUs (DDP over gloo; for trying things out)
#         ddp        N GPUs on this machine (scripts/accelerate/single_node_ddp.yaml)
#         multinode  N GPUs in total over several machines; also set MACHINE_RANK and MAIN_IP
#                    (and NUM_MACHINES, default 2) and run on every node
#         fsdp       N GPUs, Fully Sharded Data Parallel
#         deepspeed  N GPUs, DeepSpeed ZeRO-2 (pip install deepspeed)
#
# Examples:
#   scripts/launch.sh cpu 2 recipe=minilm_sst2 data.train_file=... data.validation_file=...
#   scripts/launch.sh ddp 8 recipe=bert_sst2 train.batch_size=32     # 32 per GPU = 256 per step
#   MACHINE_RANK=0 MAIN_IP=10.0.0.1 scripts/launch.sh multinode 16 recipe=bert_sst2
#
# MAIN_PORT (default 29500) is the rendezvous port of the cpu and multinode modes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mode="${1:?usage: scripts/launch.sh MODE NUM_PROCESSES [overrides...]}"
nproc="${2:?usage: scripts/launch.sh MODE NUM_PROCESSES [overrides...]}"
shift 2
case "$mode" in
  cpu)
    exec env ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_machines 1 --num_processes "$nproc" \
      --main_process_port "${MAIN_PORT:-29500}" --mixed_precision no --dynamo_backend no -m finetune "$@" ;;
  ddp)
    exec accelerate launch --config_file "$here/accelerate/single_node_ddp.yaml" --num_processes "$nproc" -m finetune "$@" ;;
  multinode)
    exec accelerate launch --config_file "$here/accelerate/multi_node_ddp.yaml" --num_processes "$nproc" \
      --num_machines "${NUM_MACHINES:-2}" --machine_rank "${MACHINE_RANK:?set MACHINE_RANK}" \
      --main_process_ip "${MAIN_IP:?set MAIN_IP}" --main_process_port "${MAIN_PORT:-29500}" -m finetune "$@" ;;
  fsdp)
    exec accelerate launch --config_file "$here/accelerate/fsdp.yaml" --num_processes "$nproc" -m finetune "$@" ;;
  deepspeed)
    exec accelerate launch --config_file "$here/accelerate/deepspeed_zero2.yaml" --num_processes "$nproc" -m finetune "$@" ;;
  *)
    echo "scripts/launch.sh: unknown mode '$mode' (cpu, ddp, multinode, fsdp, deepspeed)" >&2; exit 2 ;;
esac
