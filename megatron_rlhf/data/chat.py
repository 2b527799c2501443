"""Conversations (``{"messages": [{"role": ..., "content": ...}, ...]}``) through a chat template.

The conversational format TRL and most datasets use. The tokenizer's chat template
(``tokenizer_config.json`` ``chat_template``) renders it with jinja2 the way
``transformers.apply_chat_template`` does (sandboxed, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, ``tojson``, ``strftime_now``, the ``{% generation %}`` tag). Nothing is
added around the rendered text: the template writes bos and the turn markers itself.

Which tokens are targets. For every assistant turn i the text is split at

    before_i  = render(messages[:i], add_generation_prompt=True)   # context, ends "<|im_start|>assistant\\n"
    through_i = render(messages[:i+1])                             # + the reply and its end marker

and the assistant span ``through_i[len(before_i):]`` minus trailing whitespace (the reply
and its end marker, e.g. ``<|im_end|>``; the newline after it is context) is a target;
everything else is context; what follows the last reply is left out. Each span is tokenised apart, as PPO tokenises a prompt and
then generates after it. The last assistant turn ends with the tokenizer's eos (appended
if the template's end marker is another token), so a trained model stops where PPO and
``generate`` stop. A template that is not prefix-consistent (one that rewrites earlier
turns, e.g. dropping their reasoning) is refused with the line named.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import List, Sequence, Tuple

from .jsonl import data_error

ROLES = ("system", "user", "assistant", "tool")
CHAT_FIX = 'use {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}'


@lru_cache(maxsize=8)
def _compiled(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):  # transformers' {% generation %} ... {% endgeneration %}: renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template applied to ``messages`` (as transformers renders it)."""
    names = {}
    settings = getattr(tokenizer, "settings", {}) or {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        names[key] = settings.get(key) or ""
    return _compiled(tokenizer.chat_template).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **names)


def is_chat(record: dict) -> bool:
    return "messages" in record


def check_messages(messages, path, line: int, key: str = "messages") -> List[dict]:
    if not isinstance(messages, list) or not messages:
        raise data_error(path, line, f"{key!r} must be a non-empty list of messages", CHAT_FIX)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise data_error(path, line, f"{key}[{i}] must be {{\"role\": str, \"content\": str}}, got {json.dumps(m)[:80]}", CHAT_FIX)
        if m["role"] not in ROLES:
            raise data_error(path, line, f"{key}[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}", CHAT_FIX)
    return messages


def _need_template(tokenizer, path, line: int) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise data_error(
            path, line, f"a chat line (\"messages\"), but the tokenizer {getattr(tokenizer, 'source', '')} has no chat template",
            'use {"prompt": ..., "response": ...} lines, or a tokenizer whose tokenizer_config.json has "chat_template"',
        )


def _render(tokenizer, messages, add_generation_prompt, path, line) -> str:
    import jinja2

    try:
        return render(tokenizer, messages, add_generation_prompt)
    except jinja2.exceptions.TemplateError as exc:
        raise data_error(path, line, f"the chat template refused this conversation: {exc}", CHAT_FIX) from None


def conversation_segments(tokenizer, messages: Sequence[dict], path, line: int) -> List[Tuple[List[int], bool]]:
    """``[(ids, is_target), ...]`` covering the rendered conversation (see the module docstring).

    Raises DataError naming ``path:line`` when there is no assistant turn, no template, or
    the template is not prefix-consistent.
    """
    _need_template(tokenizer, path, line)
    messages = check_messages(messages, path, line)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise data_error(path, line, "the conversation has no assistant turn: nothing to learn", "add the assistant's reply, or drop the line")
    full = _render(tokenizer, messages, False, path, line)
    pieces: List[Tuple[str, bool]] = []
    pos = 0
    for i in turns:
        before = _render(tokenizer, messages[:i], True, path, line)
        through = _render(tokenizer, messages[: i + 1], False, path, line)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= pos):
            raise data_error(
                path, line, f"the chat template does not render turn {i} as a prefix of the whole conversation, so its "
                "assistant tokens cannot be told apart", "use a template that renders earlier turns unchanged",
            )
        reply = through[len(before):].rstrip()
        pieces += [(full[pos:len(before)], False), (reply, True)]
        pos = len(before) + len(reply)
    # what follows the last reply (a newline, say) predicts nothing that counts: left out
    segments = [(tokenizer.encode(text), target) for text, target in pieces if text]
    last = max(k for k, (_, target) in enumerate(segments) if target)
    if segments[last][0][-1:] != [tokenizer.eos_id]:
        segments[last] = (segments[last][0] + [tokenizer.eos_id], True)
    return segments


def prompt_ids(tokenizer, messages: Sequence[dict], path, line: int) -> List[int]:
    """The ids PPO generates after: the conversation so far plus the assistant header."""
    _need_template(tokenizer, path, line)
    messages = check_messages(messages, path, line)
    if messages[-1]["role"] == "assistant":
        raise data_error(path, line, "a prompt conversation ends with an assistant turn; the model is to write it",
                         "end the messages with the user's turn")
    return tokenizer.encode(_render(tokenizer, messages, True, path, line))


def reply_ids(tokenizer, messages: Sequence[dict], reply: str, path, line: int) -> List[int]:
    """The ids of one assistant reply after ``messages`` (its end marker, then eos if that is another token)."""
    before = _render(tokenizer, messages, True, path, line)
    through = _render(tokenizer, list(messages) + [{"role": "assistant", "content": reply}], False, path, line)
    if not through.startswith(before):
        raise data_error(path, line, "the chat template does not render the reply after the prompt", "use another template")
    ids = tokenizer.encode(through[len(before):].rstrip())
    return ids if ids[-1:] == [tokenizer.eos_id] else ids + [tokenizer.eos_id]
