"""What a checkpoint save costs a planned layout, and how often to save (docs/planner.md, Checkpoints).

Bytes: the rank that writes the most, DP rank 0 of the largest pipeline stage, writes DeepSpeed's module file (the
parameters of its TP shard and stage in the training dtype; under ZeRO-3 the module file holds no weights, they are
in the partitions) and its optimizer partition (fp32 master and Adam moments, as the memory model holds them).
Seconds: every GPU of a node writes at once through the node's share of the filesystem, `write_gbps` GB/s.
Interval: Young/Daly, tau = sqrt(2 x save seconds x the job's mean time between failures), where the job fails
when any of its nodes does: job MTBF = node MTBF / nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megapix.plan.memory import Memory

# Stated defaults (megapix plan --write-gbps, --node-mtbf-hours): a node's write bandwidth to a parallel filesystem
# (a Lustre/GPFS client reaches several GB/s; NFS and object stores less), and a node's mean time between failures:
# Llama 3's 16,384 H100s (2,048 nodes) had 419 unexpected interruptions in 54 days, one per ~6,300 node-hours.
WRITE_GBPS = 2.0
NODE_MTBF_HOURS = 6000.0


def save_bytes(mem: Memory, zero_stage: int) -> float:
    """Bytes the heaviest rank writes per save: its module weights (none under ZeRO-3) + master + Adam."""
    return (0.0 if zero_stage == 3 else mem.params) + mem.master + mem.optimizer


@dataclass
class SaveCost:
    bytes_per_rank: float
    seconds: float  # a blocking save's write at the stated bandwidth
    job_mtbf_s: float
    interval_s: float  # Young/Daly
    save_every: int  # the interval in steps (at least 1)


def save_cost(mem: Memory, zero_stage: int, gpus_per_node: int, nodes: int, step_s: float,
              write_gbps: float = WRITE_GBPS, node_mtbf_hours: float = NODE_MTBF_HOURS) -> SaveCost:
    per_rank = save_bytes(mem, zero_stage)
    seconds = per_rank * gpus_per_node / (write_gbps * 1e9)
    job_mtbf = node_mtbf_hours * 3600 / nodes
    interval = math.sqrt(2 * seconds * job_mtbf)
    return SaveCost(per_rank, seconds, job_mtbf, interval, max(1, round(interval / step_s)))


def describe_save(c: SaveCost, write_gbps: float, node_mtbf_hours: float, collective_timeout: float) -> list[str]:
    """The plan's checkpoint lines: size, time, the suggested --save-every, and whether the timeout covers it."""
    lines = [f"  checkpoint: {c.bytes_per_rank / 1e9:.2f} GB on the rank that writes the most, "
             f"{c.seconds:.1f} s per save at {write_gbps:g} GB/s per node (--write-gbps);",
             f"    Young/Daly at a node MTBF of {node_mtbf_hours:g} h (--node-mtbf-hours; job MTBF "
             f"{c.job_mtbf_s / 3600:.0f} h): save every {c.interval_s / 60:.0f} min, --save-every {c.save_every}"]
    if 3 * c.seconds > collective_timeout:
        lines.append(f"    a blocking save holds every rank at its barrier ~{c.seconds:.0f} s: raise "
                     f"--collective-timeout to {math.ceil(3 * c.seconds / 60) * 60} s or more, or use --async-save")
    return lines
