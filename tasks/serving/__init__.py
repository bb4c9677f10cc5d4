"""vLLM's venv and server, the pre-flight, the parity gate, what a bundle carries.

``tasks.serving.pyfunc`` is copied into each bundle and not imported here."""

from tasks.serving.bundle import VLLM_IMAGE, compose_snippet, serve_argv, write_launchers, write_mlmodel
from tasks.serving.parity import ParityError, check_parity, parity_gate, parity_table, start_server
from tasks.serving.server import Server, hot_swap, preflight, smoke_markdown, smoke_test, stop, wait_healthy
from tasks.serving.venv import server_env, vllm_python

__all__ = [
    "ParityError",
    "Server",
    "check_parity",
    "VLLM_IMAGE",
    "compose_snippet",
    "hot_swap",
    "parity_gate",
    "parity_table",
    "preflight",
    "serve_argv",
    "smoke_markdown",
    "server_env",
    "smoke_test",
    "start_server",
    "stop",
    "vllm_python",
    "wait_healthy",
    "write_launchers",
    "write_mlmodel",
]
