"""Writes general.jsonl: sftflow's default retention set (eval.retention).

Short general-knowledge instructions unrelated to any fine-tuning task, written for this
project (no third-party text), so it can ship under the project's license. A candidate whose
loss on them rises has lost some of what the base knew. Run: python make_retention.py
"""

import json
from pathlib import Path

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]  # fmt: skip
OPPOSITES = {"hot": "cold", "up": "down", "early": "late", "open": "closed", "full": "empty",
             "light": "dark", "fast": "slow", "happy": "sad"}  # fmt: skip
PLURALS = {"child": "children", "mouse": "mice", "city": "cities", "knife": "knives",
           "box": "boxes", "tooth": "teeth", "leaf": "leaves", "person": "people"}  # fmt: skip
FACTS = [
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What do plants need from sunlight?", "Plants use the energy in sunlight to make their food."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 degrees Celsius."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What gas do people need to breathe?", "People need oxygen to breathe."),
]


def records():
    for i, day in enumerate(DAYS):
        yield "Which day comes after the given day?", day, f"{DAYS[(i + 1) % 7]} comes after {day}."
    for i, month in enumerate(MONTHS[:8]):
        yield "Which month comes after the given month?", month, f"{MONTHS[i + 1]} comes after {month}."
    for word, opposite in OPPOSITES.items():
        yield "Give the opposite of the word.", word, f"The opposite of {word} is {opposite}."
    for word, plural in PLURALS.items():
        yield "Give the plural of the noun.", word, f"The plural of {word} is {plural}."
    for a, b in [(2, 3), (7, 5), (12, 9), (20, 22), (6, 7), (9, 8), (15, 15), (31, 4)]:
        yield "Add the two numbers.", f"{a} and {b}", f"{a} plus {b} is {a + b}."
    for question, answer in FACTS:
        yield question, "", answer


if __name__ == "__main__":
    out = Path(__file__).with_name("general.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for instruction, given, output in records():
            f.write(json.dumps({"instruction": instruction, "input": given, "output": output}) + "\n")
    print(f"wrote {out}")
