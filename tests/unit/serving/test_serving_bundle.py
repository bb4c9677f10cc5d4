"""The vLLM argv and compose service a bundle carries, and the prompts its pyfunc flavor reads."""

import pytest

from tasks.serving.bundle import (
    compose_snippet,
    serve_argv,
    served_length,
    template_label,
    template_record,
    tool_parser,
)


def test_merged_and_adapter_argv():
    merged = serve_argv("tiny", 512, 64, "model", "float32")
    assert merged[merged.index("--served-model-name") + 1] == "tiny"
    assert merged[merged.index("--max-model-len") + 1] == "512" and "--enable-lora" not in merged
    adapter = serve_argv("tiny", 512, 16, "/base", "bfloat16", "adapter")
    # vLLM refuses a LoRA named like its base, so the base answers to NAME-base
    assert adapter[adapter.index("--served-model-name") + 1] == "tiny-base"
    assert adapter[adapter.index("--lora-modules") + 1] == "tiny=adapter"
    assert adapter[adapter.index("--max-lora-rank") + 1] == "16"


def test_a_family_that_calls_tools_is_served_with_its_tool_parser():
    """Without a parser vLLM answers 400 to a request with tools and tool_choice auto, the API's
    default; auto picks the named template's parser, and none, or a template without tools, has none."""
    assert [tool_parser("auto", t) for t in ("qwen2.5", "qwen3", "llama3", "mistral")] == [
        "hermes", "hermes", "llama3_json", "mistral"
    ]  # fmt: skip
    assert (
        tool_parser("auto", "chatml") is tool_parser("auto", "gemma3") is tool_parser("none", "qwen3") is None
    )
    assert tool_parser("pythonic", "chatml") == "pythonic"
    argv = serve_argv("tiny", 512, 64, "model", "float32", None, "hermes")
    assert argv[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert "--tool-call-parser" not in serve_argv("tiny", 512, 64, "model", "float32")


def test_the_compose_service_runs_the_same_arguments():
    argv = serve_argv("tiny", 512, 64, "model", "float32")
    service = compose_snippet("tiny", argv, {"A": "1"})["services"]["vllm-tiny"]
    assert service["command"] == argv[3:] and service["environment"] == {"A": "1"}


def test_a_serve_json_that_would_run_anything_but_vllm_is_refused():
    """`sftflow serve` execs what a registered version's serve.json says: a version anyone could
    register must not run an arbitrary program, nor preload a library through its environment."""
    import pytest

    from tasks.core.errors import InputError
    from tasks.serving.bundle import check_serve_info

    argv = serve_argv("tiny", 512, 64, "model", "float32")
    check_serve_info({"argv": argv, "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}}, "v3")
    for bad in (["python", "-c", "import os; os.system('id')"], ["bash", *argv[1:]], argv[:2]):
        with pytest.raises(InputError, match="v3: serve.json's argv does not start vLLM's server"):
            check_serve_info({"argv": bad, "env": {}}, "v3")
    with pytest.raises(InputError, match="v3: serve.json sets LD_PRELOAD"):
        check_serve_info({"argv": argv, "env": {"LD_PRELOAD": "/tmp/x.so"}}, "v3")


def test_the_served_length_holds_the_longest_prompt_and_its_answer_within_the_positions():
    assert served_length(256, 48, 2048) == 304
    assert served_length(2048, 256, 2048) == 2048  # never past the model's positions
    assert served_length(512, 64, None) == 576


def test_the_pinned_date_is_every_request_default_and_recorded_with_the_template():
    pins = {"date_string": "02 Jan 2024"}
    argv = serve_argv("tiny", 512, 64, "model", "float32", None, None, pins)
    assert argv[-2:] == ["--default-chat-template-kwargs", '{"date_string": "02 Jan 2024"}']
    assert "--default-chat-template-kwargs" not in serve_argv("tiny", 512, 64, "model", "float32")
    record = template_record("llama3.2", "{{ date_string }}", pins)
    assert record["kwargs"] == pins and "kwargs" not in template_record("chatml", "x", {})
    assert template_label(record) == f"llama3.2 {record['sha256']} " + '{"date_string": "02 Jan 2024"}'
    assert template_label(template_record("chatml", "x", {})).count(" ") == 1


def test_the_pyfunc_reads_each_prompt_shape_as_messages_and_tools():
    import pandas as pd

    from tasks.serving.pyfunc import chat_requests

    tools = [{"type": "function", "function": {"name": "lookup_city", "parameters": {"type": "object"}}}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pune?"}]
    user = [{"role": "user", "content": "Pune?"}]
    assert chat_requests("Pune?") == [(user, None)]
    assert chat_requests(["Pune?", chat]) == [(user, None), (chat, None)]
    assert chat_requests([{"messages": chat, "tools": tools}, {"messages": chat}]) == [
        (chat, tools),
        (chat, None),
    ]
    # `mlflow models serve` hands over a DataFrame: a row without tools holds NaN there
    frame = pd.DataFrame([{"prompt": chat, "tools": tools}, {"prompt": "Pune?"}])
    assert chat_requests(frame) == [(chat, tools), (user, None)]
    needs = r"prompt 1: a chat request needs 'messages' \(it has \['prompt'\]\)"
    with pytest.raises(ValueError, match=needs):
        chat_requests(["Pune?", {"prompt": "Pune?"}])
