"""Shared test helpers: the repo's interpreter, a tiny-model config file, a subprocess runner, and the
unit/integration split (markers `slow` and `triton_interp`, see pytest.ini)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


def pytest_sessionstart(session):
    """The runs the tests start (`python megapix/train.py`, launchers) import the installed megapix, and
    megapix.kernels exists only through the install (setup.py maps kernels/ to it): both must be this checkout."""
    try:
        import megapix.kernels
    except ModuleNotFoundError as e:
        pytest.exit(f"{e}: install this checkout first, `pip install -e .` (make test does)", returncode=2)
    for module, folder in ((megapix, "megapix"), (megapix.kernels, "kernels")):
        where = os.path.dirname(os.path.realpath(module.__file__))
        if where != os.path.realpath(os.path.join(REPO, folder)):
            pytest.exit(f"{module.__name__} is imported from {where}, not from this checkout ({REPO}): "
                        f"run `pip install -e .` here (make test does)", returncode=2)


# Integration tests, marked `slow` here rather than in each file: module name -> "*" (every test in it) or the
# names of its slow test functions. tests/test_packaging.py checks that every name listed here exists.
SLOW = {
    "test_train.py": "*",  # end-to-end subprocess training runs
    "test_checkpoint.py": "*",  # layout runs (up to 4 ranks) and resumes
    "test_parallel_configs.py": "*",
    "test_slurm.py": "*",
    "test_multinode.py": "*",  # two namespaced nodes: SLURM jobs and faults across nodes
    "test_faults.py": {"test_killed_rank_is_named_and_resume_is_bit_exact",  # 2-rank runs with a fault injected
                       "test_hung_rank_bounded_by_the_collective_timeout",
                       "test_sigterm_ends_a_rank_blocked_in_a_collective"},
    "test_parallel.py": {"test_tensor_parallel_matches_single_rank_and_replicated_grads_agree",
                         "test_layout_reproduces_single_rank_curve", "test_every_layout_finishes_and_writes_samples"},
    "test_sequence_parallel.py": {"test_sequence_parallel_cuts_saved_activations"},
    "test_context_parallel.py": {"test_two_rank_context_parallel_features_equal_one_rank"},  # 2-rank workers
    "test_construct.py": {"test_construction_peak_is_the_rank_share_plus_one_parameter"},  # 2-rank builds of 405M
    "test_launchers.py": {"test_launcher_runs_two_ranks"},
    "test_launch_port.py": {"test_port_in_use_is_one_line"},
    "test_packaging.py": {"test_wheel_installs_kernels_as_megapix_kernels"},  # builds a wheel
    "test_features.py": {"test_kill_and_resume_two_ranks"},
    "test_data.py": {"test_prepare_roundtrip_resume_and_workers",  # worker processes
                     "test_load_splits_two_ranks_fit_once_and_share_errors",
                     "test_microbatches_same_for_any_workers_and_across_resume"},
    "test_checkpoint_safety.py": "*",  # training runs, kills, resumes
    "test_plan.py": {"test_planner_state_bytes_equal_what_the_engine_holds", "test_cli_table_json_and_errors",
                     "test_every_printed_command_runs_scaled_to_tiny"},
    "test_comms.py": "*",  # 2- and 8-rank DeepSpeed runs
    "test_activations.py": {"test_tp2_shard_saves_what_the_planner_counts",  # 2- and 4-rank DeepSpeed runs
                            "test_pipeline_stages_keep_min_p_minus_i_m_micro_batches_in_flight",
                            "test_activation_checkpointing_keeps_block_inputs_and_one_recompute"},
    "test_one_network.py": {"test_sampling_with_triton_kernels_goes_through_them"},  # an interpreter subprocess
    "test_finetune.py": {"test_finetune_sweep_early_stopping", "test_finetune_layout_reproduces_single_rank_curve"},
    "test_gpu_check.py": {"test_smoke_runs_every_section_on_cpu_and_writes_json_and_markdown"},  # 4 training runs
    "test_eval.py": {"test_study_guard_pretrained_layers_beat_the_random_init_control"},  # the reduced study, ~4 min
    "test_run_folder.py": {"test_two_trainings_started_together_into_one_out_one_refuses",  # training runs
                           "test_resume_with_keep_last_keeps_copied_in_and_renamed_tags_and_the_best_of_a_torn_best_json",
                           "test_full_disk_during_training_is_one_line_and_latest_stays_complete"},
}
# TRITON_INTERPRET must be set before triton is first imported, and must not reach other tests (nor their
# subprocesses): these modules run only in a pytest process started with it, the others only without it.
TRITON_INTERP = {"test_kernels.py", "test_model_kernels.py"}
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        slow = SLOW.get(module, ())
        if slow == "*" or item.originalname in slow:
            item.add_marker(pytest.mark.slow)
        if module in TRITON_INTERP:
            item.add_marker(pytest.mark.triton_interp)
            if not INTERPRETING:
                item.add_marker(pytest.mark.skip(reason="Triton interpreter test: runs in its own process, "
                                                        "TRITON_INTERPRET=1 python -m pytest -m triton_interp "
                                                        "(make test does)"))
        elif INTERPRETING:
            item.add_marker(pytest.mark.skip(reason="TRITON_INTERPRET=1 is set: only the triton_interp tests "
                                                    "run in this process (make test runs the rest separately)"))


# A 2-layer, d=64 model on 8x8 images: a DeepSpeed step takes milliseconds on one CPU core.
TINY_YAML = """\
model: {preset: tiny, n_layer: 2, d_model: 64, n_head: 4}
train: {global_batch: 8, log_every: 1, eval_batches: 1}
"""


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    # DeepSpeed JIT-builds a shm op into the torch extensions cache on first use. A cache of our own keeps these
    # runs from waiting on (or rebuilding over) builds by other interpreters that share ~/.cache/torch_extensions.
    if os.path.isdir(os.path.join(REPO, ".venv")):
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".venv", "torch_extensions"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process runs call discover(), which writes RANK/WORLD_SIZE/MASTER_* into os.environ: put the
    environment back after every test, so no later subprocess (or SLURM job) inherits another test's ranks."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return str(path)


def run(args: list[str], timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `args` (with the repo's python in front) from the repo root; text output captured."""
    return subprocess.run([PYTHON, *args], cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def tree_hash(path) -> dict[str, str]:
    """relative path -> sha256 of every file under `path`: what "nothing was changed" is checked against."""
    import hashlib

    out = {}
    for base, _, files in os.walk(path):
        for f in files:
            p = os.path.join(base, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def wait_for_first_metrics(proc: subprocess.Popen, out, timeout: float) -> None:
    """Block until the training process `proc` has written its first metrics.jsonl line under `out`."""
    import time

    deadline = time.time() + timeout
    path = os.path.join(out, "metrics.jsonl")
    while not (os.path.exists(path) and open(path).read().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no metrics line appeared"
        time.sleep(0.2)
