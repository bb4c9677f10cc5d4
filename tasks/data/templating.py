"""Conversations -> (input_ids, labels): chat templates, prompt masking, packing.

Rendering a Jinja template per record is the slow part of SFT data preparation, so each
distinct role sequence is rendered once with placeholder contents; records with that
shape are then filled in by string joins. The fast path is checked against the real
``apply_chat_template`` on the first records of every shape and is turned off for a
shape whose template treats the content as more than text (trims it, branches on it).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

import orjson

from tasks.core.errors import InputError, MissingError
from tasks.data.batching import IGNORE
from tasks.data.messages import check_tools_rendered, is_text, split_conversation, uses_tools

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
TEMPLATES = Path(__file__).parent / "templates"
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # what transformers looks for, too
SLOT = re.compile("\x00(\\d+)\x00")  # NUL never occurs in accepted data, so it cannot collide
CHECKS_PER_SHAPE = 3
# `{% set date_string = strftime_now("%d %b %Y") %}`: a template that writes today's date (Llama 3.2)
DATED = re.compile(r"""set\s+(\w+)\s*=\s*strftime_now\(\s*(['"])(.+?)\2\s*\)""")


def template_sha(template: str) -> str:
    """How manifests name a chat template."""
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def named_templates() -> dict[str, Path]:
    """The families' official templates shipped with sftflow (each file names its source)."""
    return {p.stem: p for p in sorted(TEMPLATES.glob("*.jinja"))}


def chat_template(setting: str, tokenizer) -> str:
    if setting == "auto":
        return tokenizer.chat_template or ALPACA_TEMPLATE
    if setting == "alpaca":
        return ALPACA_TEMPLATE
    if setting == "chatml":
        return CHATML_TEMPLATE
    path = named_templates().get(setting) or Path(setting)
    if not path.is_file():
        names = ", ".join(["auto", "alpaca", "chatml", *named_templates()])
        raise MissingError(f"data.template: {setting} is none of {names}, and not a file")
    return path.read_text(encoding="utf-8")


def pinned_date(template: str, day) -> dict[str, str]:
    """The template variables that fix the date a template writes from the clock (Llama 3.2's
    ``date_string``) to ``day``, so that training, evaluate, the parity gate and the bundle's vLLM
    all render the same prompt; {} for a template that does not read the clock. A template that
    reads it into a variable it does not let a caller set cannot be pinned for vLLM: refused."""
    if "strftime_now" not in template:
        return {}
    pins = {name: day.strftime(fmt) for name, _, fmt in DATED.findall(template)}
    fixed = [name for name in pins if re.search(rf"\b{name}\s+is\s+defined", template)]
    if not pins or len(fixed) < len(pins):
        loose = sorted(set(pins) - set(fixed)) or ["strftime_now(...)"]
        raise InputError(
            f"data.template writes today's date ({', '.join(loose)} from strftime_now) and no variable can "
            "set it from outside, so evaluate, the parity gate and a server on another day would render "
            "other prompts than training did; use a copy of the template that sets it only when "
            "undefined, as Llama 3.2's does: {%- if not date_string is defined %}"
        )
    return pins


class Renderer:
    """Splits a conversation into (text, trained) pieces: each assistant answer with its
    end-of-turn token is trained; the prompt before it is rendered with the generation
    prompt, exactly as at inference time."""

    def __init__(self, tokenizer, template: str, template_kwargs: dict | None = None):
        self.tokenizer, self.template = tokenizer, template
        self.kwargs = template_kwargs or {}  # the pinned date of a template that reads the clock
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
        stop = end_of_turn_id(tokenizer, template)
        self.stop_id = stop if stop is not None else self.eos_id  # what each answer must train
        self.marked = bool(GENERATION.search(template))
        self.plans: dict[tuple, list | None] = {}
        self.checked: dict[tuple, int] = {}
        self._encode = None

    @property
    def encode(self):
        if self._encode is None:
            self._encode = encoder(self.tokenizer)
        return self._encode

    def slow_pieces(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        if self.marked:
            return self.marked_pieces(messages, tools)
        pieces, done = [], ""
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt, full = (
                self.render(messages[:i], True, tools),
                self.render(messages[: i + 1], False, tools),
            )
            if not prompt.startswith(done) or not full.startswith(prompt):
                return self.anchored_pieces(messages, tools)
            pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        return pieces

    def render(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
        """The template's text; what the template itself refuses (Gemma's "System role not
        supported") is an input error naming the roles."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.template, tokenize=False,
                add_generation_prompt=generation_prompt, **self.kwargs,
            )  # fmt: skip
        except TemplateError as e:
            roles = [m["role"] for m in messages]
            raise InputError(f"data.template refuses a conversation of roles {roles}: {e}") from None

    @property
    def stop_text(self) -> str:
        """The stop token as the rendered text holds it."""
        return self.tokenizer.decode([self.stop_id]) if self.stop_id >= 0 else ""

    def anchored_pieces(
        self, messages: list[dict], tools: list[dict] | None = None
    ) -> list[tuple[str, bool]]:
        """For a template whose earlier turns render differently once a conversation goes on (Qwen 3
        drops their reasoning, Phi-3 ends the conversation with EOS): the whole conversation
        rendered once, each answer trained from where its own inference prompt ends (that prompt
        must be a prefix of the rendering) through its end-of-turn token."""
        whole, stop = self.render(messages, False, tools), self.stop_text
        pieces, at = [], 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], True, tools)
            end = whole.find(stop, len(prompt)) + len(stop) if whole.startswith(prompt) else -1
            if len(prompt) < at or end < len(stop) or msg["content"].strip() not in whole[len(prompt) : end]:
                raise InputError(
                    f"data.template: in a conversation of roles {[m['role'] for m in messages]}, the answer in "
                    f"message {i} cannot be masked exactly: its inference prompt is not a prefix of the whole "
                    "conversation's rendering (e.g. a system prompt moved into the last user turn); mark "
                    "what the model generates with {% generation %} ... {% endgeneration %} in the template"
                )
            pieces += [(whole[at : len(prompt)], False), (whole[len(prompt) : end], True)]
            at = end
        return pieces + [(whole[at:], False)] if at < len(whole) else pieces

    def marked_pieces(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        """The whole conversation rendered once, trained where the template's ``{% generation %}``
        blocks are (transformers' own tracker): exact on templates that do not render prefix by
        prefix, such as a system prompt moved into the last user turn."""
        from transformers.utils.chat_template_utils import render_jinja_template

        texts, spans = render_jinja_template(
            [messages], tools=tools, chat_template=self.template, return_assistant_tokens_mask=True,
            **self.tokenizer.special_tokens_map, **self.kwargs,
        )  # fmt: skip
        text, pieces, at = texts[0], [], 0
        for start, end in spans[0]:
            pieces += [(text[at:start], False), (text[start:end], True)]
            at = end
        return [p for p in [*pieces, (text[at:], False)] if p[0]]

    def _plan(self, roles: tuple) -> list | None:
        """Pieces as lists of literal strings and content slots, or None when the template
        does not insert contents verbatim."""
        probe = lambda pad: [{"role": r, "content": f"{pad}\x00{i}\x00{pad}"} for i, r in enumerate(roles)]
        plain, padded = self.slow_pieces(probe("")), self.slow_pieces(probe(" \n"))
        text = "".join(t for t, _ in plain)
        if sorted(int(m) for m in SLOT.findall(text)) != list(range(len(roles))):
            return None
        if [(SLOT.sub(lambda m: f" \n{m.group(0)} \n", t), tr) for t, tr in plain] != padded:
            return None
        return [
            ([int(p) if k % 2 else p for k, p in enumerate(SLOT.split(t)) if p != "" or k % 2], tr)
            for t, tr in plain
        ]

    def pieces(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        if messages[0]["role"] == "text":  # plain text: trained on everything
            return [(messages[0]["content"] + (self.tokenizer.eos_token or ""), True)]
        if uses_tools(messages, tools):  # calls and tools are not verbatim contents: no fast plan
            pieces = self.slow_pieces(messages, tools)
            check_tools_rendered(messages, tools, pieces)
            return pieces
        roles = tuple(m["role"] for m in messages)
        if roles not in self.plans:
            self.plans[roles] = self._plan(roles)
            self.checked[roles] = 0
        plan = self.plans[roles]
        if plan is None:
            return self.slow_pieces(messages)
        contents = [m["content"] for m in messages]
        out = [
            ("".join(contents[p] if isinstance(p, int) else p for p in parts), trained)
            for parts, trained in plan
        ]
        if self.checked[roles] < CHECKS_PER_SHAPE:
            self.checked[roles] += 1
            if out != (slow := self.slow_pieces(messages)):
                self.plans[roles] = None  # content-dependent template: the real renderer from now on
                return slow
        return out

    def answer(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The last turn (an assistant's) as a perfect model's decoded answer reads: its trained
        text up to the stop, without special tokens. The reference for an answer that calls tools."""
        trained = [text for text, tr in self.pieces(messages, tools) if tr][-1]
        text = trained.rsplit(self.stop_text, 1)[0] if self.stop_text else trained
        return self.tokenizer.decode(self.encode([text])[0], skip_special_tokens=True).strip()

    @property
    def fast(self) -> bool:
        """Whether every shape seen so far took the fast path."""
        return all(p is not None for p in self.plans.values())


def end_of_turn_id(tokenizer, template: str) -> int | None:
    """The special token the template puts right after an assistant answer (ChatML's
    ``<|im_end|>``, Alpaca's EOS), if there is one: generation must stop on it."""
    marker = "SFTFLOW_ANSWER_END"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    after = text.split(marker, 1)[1].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    return ids[0] if ids and ids[0] in special else None


def prompt_text(
    tokenizer, messages: list[dict], tools: list[dict] | None = None, template_kwargs: dict | None = None
) -> str:
    """A prompt as the model sees it before answering: what evaluate generates from and what a
    server's ``/tokenize`` must reproduce (the tokenizer carries the training template, and
    ``template_kwargs`` the date pinned for a template that reads the clock)."""
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """EOS and the end-of-turn token: what greedy generation and a server must stop on."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer, template)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def encoder(tokenizer):
    """The tokenizer's batch encode without offsets when it gives the same ids (about 1.6x faster)."""

    def wrapped(texts):
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    backend = getattr(tokenizer, "_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None:
        return wrapped
    probe = ["Hello world!", " two  spaces\n\nand lines", "<|im_start|>user\nünïcödé 日本<|im_end|>\n", "x"]
    direct = lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]
    return direct if direct(probe) == wrapped(probe) else wrapped


def tokenize_conversations(convs: list, renderer: Renderer, train_on_inputs: bool):
    """All pieces of all conversations go through the tokenizer in one batched call.

    Returns flat numpy arrays (ids, labels) and each conversation's length: no per-token
    Python lists are built, so a batch converts to Arrow without copying token by token.
    """
    import numpy as np

    plan = [renderer.pieces(*split_conversation(c)) for c in convs]
    flat = [text for pieces in plan for text, _ in pieces]
    ids = renderer.encode(flat) if flat else []
    piece_len = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    total = int(piece_len.sum())
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total)
    trained = np.fromiter(
        (tr or train_on_inputs for pieces in plan for _, tr in pieces), dtype=bool, count=len(ids)
    )
    labels = np.where(np.repeat(trained, piece_len), flat_ids, IGNORE).astype(np.int32)
    per_conv = np.fromiter((len(p) for p in plan), dtype=np.int64, count=len(plan))
    owner = np.repeat(np.arange(len(plan)), per_conv)
    lengths = np.bincount(owner, weights=piece_len, minlength=len(plan)).astype(np.int64)
    return flat_ids, labels, lengths


# ---------------------------------------------------------------- datasets.map functions of the format stage

OK, TOO_LONG, TRUNCATED = 0, 1, 2  # a tokenized example fits, does not, or was cut to fit


def tokenize_batch(
    batch, renderer: Renderer, max_len: int, excess: str, train_on_inputs: bool, source_names: list[str]
):
    """One Arrow batch of conversations -> tokenized examples with a status (ok, too long, truncated)
    and whether each trains its stop: the end-of-turn token, or EOS for plain text."""
    import numpy as np
    import pyarrow as pa

    convs = [orjson.loads(c) for c in batch.column("conv").to_pylist()]
    ids, labels, lengths = tokenize_conversations(convs, renderer, train_on_inputs)
    stop = np.fromiter(
        (renderer.eos_id if is_text(c) else renderer.stop_id for c in convs), np.int64, len(convs)
    )
    over = lengths > max_len
    if over.any() and excess == "error":
        i = int(np.flatnonzero(over)[0])
        raise InputError(
            f"{source_names[batch.column('source')[i].as_py()]}:{batch.column('line')[i].as_py()}: "
            f"{lengths[i]} tokens > data.max_seq_len={max_len} (data.excess_length: error)"
        )
    status = np.where(over, TRUNCATED if excess == "truncate" else TOO_LONG, OK).astype(np.int8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if excess == "truncate" and over.any():
        keep = (np.arange(len(ids)) - np.repeat(starts, lengths)) < max_len
        ids, labels, lengths = ids[keep], labels[keep], np.minimum(lengths, max_len)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    trained = np.bincount(owner, weights=labels != IGNORE, minlength=len(lengths))
    status[trained == 0] = TOO_LONG  # nothing left to train on: counted, never kept silently empty
    stops = np.bincount(owner, weights=labels == np.repeat(stop, lengths), minlength=len(lengths)) > 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
            "length": pa.array(lengths.astype(np.int32)),
            "status": pa.array(status),
            "stops": pa.array(stops),
            "source": batch.column("source"),
            "line": batch.column("line"),
        }
    )
