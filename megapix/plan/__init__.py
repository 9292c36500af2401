"""The planner: per-GPU memory, step time, tokens/s and MFU of a training layout on a cluster, and every layout that
fits, ranked (`megapix plan`). A model of the engine, checked term by term against it (checks, comms); only the device
constants are assumed. The formulas and what each was checked against: docs/planner.md.

devices (the device constants), memory, timing, search, report, run (the commands printed for a real run); checks
and comms are imported by their path. The command line is megapix.commands.plan.
"""
from megapix.parallel.layout import Layout, layout_problems
from megapix.plan.devices import (BUCKET_ELEMENTS, COMM_EFFICIENCY, DEVICES, EFFICIENCY, FULL_WIDTH, LATENCY_S, PLANNED,
                                  WORKSPACE_BYTES, Device, GiB, device_for)
from megapix.plan.memory import (KERNEL_PATHS, Memory, block_activation_bytes, checkpointed_block_bytes,
                                 embed_activation_bytes, head_activation_bytes, in_flight, layer_params,
                                 loss_transient_bytes, memory, partition_balanced, pipe_buffer_bytes, ring_block_bytes,
                                 ring_pairs, stage_activation_bytes, stage_layers, stage_params, state_bytes,
                                 zero3_kept_and_regathered)
from megapix.plan.report import (ASSUMPTIONS, RESOLUTIONS, TABLE_GPUS, check_layouts, check_table, deepspeed_estimate,
                                 describe, largest_resolution, max_resolution_table, predicted_states, readme_table,
                                 table)
from megapix.plan.search import (MAX_GPUS, PAPER_BATCH, PAPER_ITERATIONS, Plan, candidates, ds_config, ds_config_file,
                                 pinned_problem, plan_one, search, train_command)
from megapix.plan.timing import Timing, comm_bytes, step_time

__all__ = [name for name in dir() if not name.startswith("_")]
