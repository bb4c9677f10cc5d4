"""How the train stage starts its ranks: DeepSpeed's launchers, or one rank on its own."""

from pathlib import Path

from tasks.config import TrainConfig
from tasks.training.launcher import launch_command, single_rank_env

SPEC = Path("/run/train/spec.json")


def test_one_process_starts_the_rank_itself_with_the_launchers_environment():
    t = TrainConfig(num_processes=1, master_addr="127.0.0.1")
    cmd = launch_command(t, SPEC, 29500)
    assert cmd[1:] == ["-u", "-m", "tasks.training.worker", "--spec", str(SPEC)]
    env = single_rank_env(t, 29500)
    assert env == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "CROSS_RANK": "0",
                   "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # fmt: skip


def test_several_processes_go_through_deepspeeds_launcher_which_sets_their_environment():
    t = TrainConfig(num_processes=2)
    cmd = launch_command(t, SPEC, 29500)
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"] and cmd[-4:] == [
        "--module", "tasks.training.worker", "--spec", str(SPEC),
    ]  # fmt: skip
    assert single_rank_env(t, 29500) == {}


def test_a_launch_removes_only_its_own_shared_memory_buffers(tmp_path):
    """Two trainings on one host: DeepSpeed's CPU allreduce names its /dev/shm buffers by master
    port. Removing another run's buffer that appeared meanwhile left that run's rank 0 waiting
    for it forever (seen in CI: two 2-rank trainings at once, one hung for 15 minutes)."""
    import os
    import sys

    from tasks.training.launcher import free_port, supervise

    port, other = free_port(), free_port()
    name = "/dev/shm/deepspeed_allreduce_buffer_{}_127.0.0.1_{}_1".format
    ours, theirs = Path(name(os.getuid(), port)), Path(name(os.getuid(), other))
    make = f"open({str(ours)!r}, 'w'); open({str(theirs)!r}, 'w')"  # as a rank of each run would
    try:
        supervise([sys.executable, "-c", make], dict(os.environ), tmp_path / "train.log", 60, print,
                  shm=("127.0.0.1", port))  # fmt: skip
        assert theirs.exists() and not ours.exists()
    finally:
        theirs.unlink(missing_ok=True)
        ours.unlink(missing_ok=True)
