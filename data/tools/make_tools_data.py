"""Writes data/tools/train.jsonl: tool-calling conversations in OpenAI's chat format.

Each record offers one tool, ``lookup_city`` (a city's ISO 3166 country code), in a ``tools``
column. The user asks for a city's country code; the assistant calls the tool (arguments as
JSON text, as OpenAI's API sends them), the ``tool`` turn returns the code, and the assistant
answers with it. Half the records stop after the call, so what the model learns to generate
is the call itself as often as the answer that uses its result. The cities are the demo's
(data/demo/make_demo_data.py). Deterministic: rerunning writes the same file.
"""

import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("demo", HERE.parent / "demo" / "make_demo_data.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_city",
            "description": "The ISO 3166 country code of the country a city is in.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "the city's name"}},
                "required": ["city"],
            },
        },
    }
]
QUESTIONS = [
    "Which country code does {city} have?",
    "What is the ISO country code for {city}?",
    "Look up the country of {city}, please.",
    "{city}: which country is that, as an ISO code?",
]


def main(name: str = "train.jsonl", n: int = 200, seed: int = 11) -> None:
    rng = random.Random(seed)
    out = HERE / name
    with out.open("w", encoding="utf-8") as f:
        for k in range(n):
            city = rng.choice(demo.CITIES)
            call_id = f"call{k:05d}"  # nine letters and digits: Mistral's template requires it
            call = {"name": "lookup_city", "arguments": json.dumps({"city": city})}
            messages = [
                {"role": "user", "content": rng.choice(QUESTIONS).format(city=city)},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"id": call_id, "type": "function", "function": call}],
                },
            ]
            if k % 2:
                code = demo.COUNTRY[city]
                messages += [
                    {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"country": code})},
                    {"role": "assistant", "content": f"{city} is in {code}."},
                ]
            f.write(json.dumps({"tools": TOOLS, "messages": messages}, ensure_ascii=False) + "\n")
    print(f"wrote {n} records to {out}")


if __name__ == "__main__":
    main()
