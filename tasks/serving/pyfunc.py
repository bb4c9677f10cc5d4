"""MLflow's ``python_function`` flavor for an sftflow bundle, so MLflow's own tools load it:

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict(["What is 2+2?"], params={"max_new_tokens": 64})
    model.predict([{"messages": [{"role": "user", "content": "Weather in Graz?"}], "tools": [...]}])

The handoff copies this file into each bundle as ``code/sftflow_pyfunc.py``; it imports only
torch, transformers and peft (no sftflow). It answers as the evaluate stage did: the training
chat template, greedy decoding, stopping at EOS or the end-of-turn token, in the bundle's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path


class BundleModel:
    def __init__(self, bundle: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.info = json.loads((bundle / "serve.json").read_text())
        dtype = getattr(torch, self.info["dtype"])
        merged = self.info["mode"] == "merged"
        path = bundle / "model" if merged else Path(self.info["model"])  # adapter mode: the base
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if not merged:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, bundle / "adapter")
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.chat_template = (bundle / "chat_template.jinja").read_text(encoding="utf-8")
        self.template_kwargs = self.info["chat_template"].get("kwargs", {})  # the date training pinned
        # the pre-flight wrote the EOS that covers the end-of-turn token (in adapter mode, beside the model)
        gen_dir = bundle if (bundle / "generation_config.json").is_file() else path
        self.eos = GenerationConfig.from_pretrained(gen_dir).eos_token_id

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        """Each prompt a string, a chat message list, or a chat request ``{"messages", "tools"}``
        (OpenAI's shape: the family template renders the tools, as evaluate did); or a DataFrame
        with a ``prompt`` column and, optionally, ``tools``. A tool call comes back as the text
        the model wrote (vLLM's tool parser is what turns it into ``tool_calls``)."""
        import torch

        max_new = int((params or {}).get("max_new_tokens", self.info.get("max_tokens", 256)))
        answers = []
        for messages, tools in chat_requests(model_input):
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **self.template_kwargs
            )
            enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = self.model.generate(
                    **enc,
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=self.eos,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            answer = out[0, enc["input_ids"].shape[1] :]
            answers.append(self.tokenizer.decode(answer, skip_special_tokens=True).strip())
        return answers


def chat_requests(model_input) -> list[tuple[list[dict], list[dict] | None]]:
    """(messages, tools) per prompt, whichever of the shapes ``predict`` takes it came in."""
    if hasattr(model_input, "columns"):  # a DataFrame, as `mlflow models serve` passes one
        tools = model_input["tools"] if "tools" in model_input.columns else [None] * len(model_input)
        model_input = [{"messages": p, "tools": t} for p, t in zip(model_input["prompt"], tools)]
    if isinstance(model_input, (str, dict)):
        model_input = [model_input]
    requests = []
    for i, prompt in enumerate(model_input):
        tools = None
        if isinstance(prompt, dict):
            if "messages" not in prompt:
                raise ValueError(f"prompt {i}: a chat request needs 'messages' (it has {sorted(prompt)})")
            prompt, tools = prompt["messages"], prompt.get("tools")
        # a row without tools in a DataFrame holds None or NaN; with them, a list or an array
        tools = None if tools is None or isinstance(tools, float) else list(tools) or None
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        requests.append((messages, tools))
    return requests


def _load_pyfunc(data_path: str) -> BundleModel:
    return BundleModel(Path(data_path))
