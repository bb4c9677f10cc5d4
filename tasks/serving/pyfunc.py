"""MLflow's ``python_function`` flavor for an sftflow bundle, so MLflow's own tools load it:

    mlflow.pyfunc.load_model("models:/NAME@champion").predict(["What is 2+2?"])

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
        """Prompts as strings, chat message lists, or a DataFrame with a ``prompt`` column."""
        import torch

        if hasattr(model_input, "columns"):
            model_input = list(model_input["prompt"])
        if isinstance(model_input, str):
            model_input = [model_input]
        max_new = int((params or {}).get("max_new_tokens", self.info.get("max_tokens", 256)))
        answers = []
        for prompt in model_input:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs
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


def _load_pyfunc(data_path: str) -> BundleModel:
    return BundleModel(Path(data_path))
