"""The vLLM argv and compose service a bundle carries."""

from tasks.serving.bundle import compose_snippet, serve_argv


def test_merged_and_adapter_argv():
    merged = serve_argv("tiny", 512, 64, "model", "float32")
    assert merged[merged.index("--served-model-name") + 1] == "tiny"
    assert merged[merged.index("--max-model-len") + 1] == "512" and "--enable-lora" not in merged
    adapter = serve_argv("tiny", 512, 16, "/base", "bfloat16", "adapter")
    # vLLM refuses a LoRA named like its base, so the base answers to NAME-base
    assert adapter[adapter.index("--served-model-name") + 1] == "tiny-base"
    assert adapter[adapter.index("--lora-modules") + 1] == "tiny=adapter"
    assert adapter[adapter.index("--max-lora-rank") + 1] == "16"


def test_the_compose_service_runs_the_same_arguments():
    argv = serve_argv("tiny", 512, 64, "model", "float32")
    service = compose_snippet("tiny", argv, {"A": "1"})["services"]["vllm-tiny"]
    assert service["command"] == argv[3:] and service["environment"] == {"A": "1"}
