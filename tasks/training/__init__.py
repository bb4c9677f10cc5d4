"""DeepSpeed's launcher and its supervision, the memory estimate, hosts, attention per packed example.

The per-rank program, ``tasks.training.worker``, is started by module name and not imported here."""

from tasks.training.attention import describe, register
from tasks.training.deepspeed import deepspeed_config
from tasks.training.hosts import check_master_port, ssh_env
from tasks.training.launcher import free_port, launch_command, supervise_node
from tasks.training.memory import estimate

__all__ = [
    "check_master_port",
    "deepspeed_config",
    "describe",
    "estimate",
    "free_port",
    "launch_command",
    "register",
    "ssh_env",
    "supervise_node",
]
