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
