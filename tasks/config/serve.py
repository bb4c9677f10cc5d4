"""``serve``: the vLLM bundle, the parity gate's thresholds and an endpoint to smoke-test."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from tasks.config.base import Section
from tasks.config.hostfile import is_loopback


class ParityConfig(Section):
    """Thresholds of the train/serve parity gate (tasks/serving/parity.py); docs/stages.md has the measurements."""

    enabled: bool = Field(
        True,
        description="serve the bundle with vLLM and compare it with the evaluated model before registering",
    )
    min_template_match: float = Field(
        1.0, ge=0, le=1, description="share of prompts whose served token ids equal training's"
    )
    # fp32 served as evaluated agreed 40/40 on every demo bundle; the bf16-served QLoRA bundle,
    # another model in effect, 38/40: this allows one near-tie flip in 40 and refuses that one
    min_agreement: float = Field(
        0.975, ge=0, le=1, description="share of greedy answers equal to the evaluated candidate's"
    )
    max_stop_mismatches: int = Field(
        0, ge=0, description="answers cut at max tokens where the evaluated one stopped"
    )
    max_tool_call_mismatches: int = Field(
        0,
        ge=0,
        description="evaluated tool calls that the server's tool parser does not return as that call "
        "(checked where the bundle has a tool parser)",
    )
    # vLLM batches concurrent requests, as a production server does; on the demo, 40 prompts 16 at
    # a time took 12 s against 69 s one at a time, with the same answers (docs/benchmarks.md)
    concurrency: int = Field(16, ge=1, description="parity prompts in flight at once (1: one at a time)")
    start_early: bool | None = Field(
        None,
        description="start the parity server from the bundle as soon as merge ends, so it loads and "
        "compiles while evaluate scores; default: yes without CUDA, no with it (vLLM would claim the "
        "GPU memory evaluate uses)",
    )


class ServeConfig(Section):
    mode: Literal["merged", "adapter"] = "merged"
    served_model_name: str | None = Field(None, description="default: run_name")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="vLLM's --dtype; default: the dtype the evaluate stage ran in"
    )
    max_lora_rank: int = Field(64, gt=0)
    tool_call_parser: str = Field(
        "auto",
        description="vLLM's --tool-call-parser in the bundle: auto (data.template's: hermes for qwen2.5 and "
        "qwen3, llama3_json for llama3 and llama3.2, mistral for mistral; none for the others), none, or a "
        "parser name",
    )
    parity: ParityConfig = Field(default_factory=ParityConfig)
    health_timeout_s: int = Field(600, gt=0, description="how long vLLM may take to answer /v1/models")
    endpoint: str | None = Field(
        None, description="a running OpenAI-compatible base URL (http://host:port/v1) to smoke-test"
    )
    smoke_prompts: int = Field(3, gt=0, description="eval prompts sent to serve.endpoint as chat completions")
    max_tokens: int = Field(256, gt=0)
    hot_swap: bool = Field(
        False, description="adapter mode: load a promoted adapter into the running vLLM at endpoint"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="environment variable holding the endpoint's API key ('' sends none); "
        "never sent over plain http to another host",
    )

    @model_validator(mode="after")
    def _needs_endpoint(self) -> ServeConfig:
        if self.hot_swap and not self.endpoint:
            raise ValueError("serve.hot_swap needs serve.endpoint (e.g. http://127.0.0.1:8000/v1)")
        if self.hot_swap and self.mode != "adapter":
            raise ValueError("serve.hot_swap loads a LoRA adapter: it needs serve.mode adapter")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"serve.endpoint {self.endpoint!r} must start with http:// or https://")
        host = urlsplit(self.endpoint or "").hostname or ""
        if (
            self.endpoint
            and self.endpoint.startswith("http://")
            and self.api_key_env
            and not is_loopback(host)
        ):
            raise ValueError(
                f"serve.endpoint {self.endpoint!r} is plain http to another host: the API key in "
                f"${self.api_key_env} would cross the network in clear text; use https://, or set "
                "serve.api_key_env: '' to send no key"
            )
        return self
