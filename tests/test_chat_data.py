"""Chat-format data ({"messages": [...]}) through the tokenizer's chat template: the loss
mask covers the assistant turns only, prompts end with the assistant header, rankings
and TRL's preference formats render alike, bad lines name file:line."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from hf_fixtures import write_hf_tokenizer  # noqa: E402

from megatron_rlhf.data import DataError, collate_sft, load_comparisons, load_prompts, load_sft  # noqa: E402
from megatron_rlhf.data.chat import render  # noqa: E402
from megatron_rlhf.data.tokenizer import Tokenizer  # noqa: E402

CONVERSATION = [
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "Apple."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Pear, of course."},
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_tok")
    return {style: Tokenizer.load(write_hf_tokenizer(root / style, style)) for style in ("qwen2", "llama3", "gpt2")}


def _write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _runs(batch, row=0):
    """Contiguous runs of counted labels, as token lists."""
    runs, current = [], []
    for label, counted in zip(batch.labels[row].tolist(), batch.loss_mask[row].tolist()):
        if counted:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_render_matches_transformers(toks, style, tmp_path):
    tok = toks[style]
    hf = transformers.AutoTokenizer.from_pretrained(tok.source.rsplit("/", 1)[0])
    for gen in (False, True):
        messages = CONVERSATION if not gen else CONVERSATION[:3]
        assert render(tok, messages, gen) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_sft_loss_mask_covers_assistant_turns_only(toks, style, tmp_path):
    tok = toks[style]
    (example,), stats = load_sft(_write(tmp_path, [{"messages": CONVERSATION}]), tok, seq_length=128)
    assert stats.kept == 1 and stats.truncated == 0
    # the whole rendered conversation, tokenised at turn boundaries, is the sequence
    assert example.tokens == tok.encode(render(tok, CONVERSATION).rstrip())
    if style == "llama3":
        assert example.tokens[0] == tok.bos_id and example.tokens[1] != tok.bos_id  # the template's bos, once
    batch = collate_sft([example], pad_id=tok.pad_id, max_len=128)
    end = "<|im_end|>" if style == "qwen2" else "<|eot_id|>"
    assert [tok._tk.decode(run, skip_special_tokens=False) for run in _runs(batch)] == ["Apple." + end, "Pear, of course." + end]
    assert tok.eos_id == tok.encode(end)[0]  # the reply ends with eos: generation stops there
    assert int(batch.loss_mask.sum()) == len(tok.encode("Apple." + end)) + len(tok.encode("Pear, of course." + end))


def test_plain_lines_still_work_and_mix(toks, tmp_path):
    tok = toks["qwen2"]  # no bos: the sequence starts with the prompt
    path = _write(tmp_path, [{"prompt": "Name a fruit.", "response": " Apple."}, {"messages": CONVERSATION[:2]}])
    (plain, chat), _ = load_sft(path, tok, seq_length=128)
    assert plain.prompt_ids == tok.encode("Name a fruit.") and plain.response_ids == tok.encode(" Apple.") + [tok.eos_id]
    assert plain.response_mask is None and chat.response_mask is None  # one reply at the end: every response id counts
    assert tok._tk.decode(chat.response_ids, skip_special_tokens=False) == "Apple.<|im_end|>"


def test_chat_truncation_keeps_the_replies(toks, tmp_path):
    tok = toks["qwen2"]
    long = [{"role": "user", "content": "fruit " * 60}, {"role": "assistant", "content": "Plum."}]
    (example,), stats = load_sft(_write(tmp_path, [{"messages": long}]), tok, seq_length=40)
    assert stats.truncated == 1 and len(example.tokens) <= 41
    assert tok._tk.decode(example.response_ids, skip_special_tokens=False) == "Plum.<|im_end|>"
    with pytest.raises(DataError, match=r"data.jsonl:1: .*too long"):
        load_sft(_write(tmp_path, [{"messages": long}]), tok, seq_length=40, truncation="error")


def test_chat_prompts_end_with_the_assistant_header(toks, tmp_path):
    tok = toks["qwen2"]
    hf = transformers.AutoTokenizer.from_pretrained(tok.source.rsplit("/", 1)[0])
    (ids,) = load_prompts(_write(tmp_path, [{"messages": CONVERSATION[:3]}]), tok, max_prompt_len=128)
    assert ids == hf.apply_chat_template(CONVERSATION[:3], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok._tk.decode(ids, skip_special_tokens=False).endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: .*ends with an assistant turn"):
        load_prompts(_write(tmp_path, [{"messages": CONVERSATION}]), tok, max_prompt_len=128)


def test_chat_comparisons_in_every_format_agree(toks, tmp_path):
    tok = toks["qwen2"]
    prompt = CONVERSATION[:3]
    good, bad = "Pear, of course.", "No."
    records = [
        {"messages": prompt, "chosen": good, "rejected": bad},
        {"messages": prompt, "responses": [bad, good], "ranking": [2, 1]},
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]},
        {"chosen": prompt + [{"role": "assistant", "content": good}], "rejected": prompt + [{"role": "assistant", "content": bad}]},
    ]
    examples, _ = load_comparisons(_write(tmp_path, records), tok, seq_length=128)
    by_rank = [{r: ids for r, ids in zip(e.ranks, e.response_ids)} for e in examples]
    assert all(e.prompt_ids == examples[0].prompt_ids for e in examples)
    assert all(b == by_rank[0] for b in by_rank)
    assert examples[0].prompt_ids + by_rank[0][1] == tok.encode(render(tok, prompt + [{"role": "assistant", "content": good}]).rstrip())
    assert by_rank[0][1][-1] == tok.eos_id  # the reward is read at <|im_end|>, where PPO's responses end


def test_bad_chat_lines_name_file_and_line(toks, tmp_path):
    tok = toks["qwen2"]
    ok = {"messages": CONVERSATION[:2]}
    no_reply = {"messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(DataError, match=r"data.jsonl:2: the conversation has no assistant turn"):
        load_sft(_write(tmp_path, [ok, no_reply]), tok, 64)
    with pytest.raises(DataError, match=r"data.jsonl:1: messages\[0\] has role 'robot'"):
        load_sft(_write(tmp_path, [{"messages": [{"role": "robot", "content": "x"}]}]), tok, 64)
    with pytest.raises(DataError, match=r"data.jsonl:1: messages\[1\] must be"):
        load_sft(_write(tmp_path, [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}]), tok, 64)
    with pytest.raises(DataError, match=r"data.jsonl:1: a chat line .* has no chat template"):
        load_sft(_write(tmp_path, [ok]), toks["gpt2"], 64)
    with pytest.raises(DataError, match=r"data.jsonl:1: implicit-prompt pair"):
        load_comparisons(_write(tmp_path, [{"chosen": CONVERSATION[:2], "rejected": CONVERSATION[2:]}]), tok, 64)
