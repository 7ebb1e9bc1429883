"""Data files users hand to charbuild (files to `check`, prompt pools) end in a message
naming the file and line, never a traceback or a silently skipped row; the layouts people
keep prompts in (LIMA's conversations, chat messages) are read as they are."""

from __future__ import annotations

import json

import pytest

from support.api_build import in_api_workdir, persona_reply, run, write_spec
from support.openai_server import FakeOpenAIServer

from charbuild.cli import main


def _check(capsys, *args):
    code = main(["check", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_given_a_directory_says_so(tmp_path, capsys):
    code, _, err = _check(capsys, tmp_path)
    assert code != 0 and "is a directory" in err and "Traceback" not in err


@pytest.mark.parametrize("content, says", [
    (b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n', ":2: not UTF-8 text (byte 0xe9 at column 14)"),
    (b'{"text": "fine"}\n[1, 2]\n', ":2: expected a JSON object per line, got list"),
    (b'{"text": "fine"}\n\n{"text": \n', ":3: not JSON"),
    (b'{"nottext": "a reply"}\n', ":1: no text to check: expected one of response, chosen"),
    (b'{"text": 5}\n', ":1: text is int, expected text"),
])
def test_a_file_check_cannot_read_names_its_line(tmp_path, capsys, content, says):
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    code, out, err = _check(capsys, f)
    assert code != 0 and f"{f}{says}" in err, err
    assert "Traceback" not in err and not out


def test_an_empty_reply_is_a_finding_not_an_error(tmp_path, capsys):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "I'm so sorry, here is a long enough reply."}) + "\n")
    code, out, _ = _check(capsys, f)
    assert code == 0 and "1 of 2 ok" in out and "empty 1" in out


def _pool_spec(tmp_path, base_url, rows: list | bytes) -> tuple:
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(rows if isinstance(rows, bytes) else "".join(json.dumps(r) + "\n" for r in rows).encode())
    spec = write_spec(tmp_path, base_url, dpo_pairs=10)
    spec.write_text(spec.read_text().replace("prompts: {general_limit: 40, per_trait: 5}",
                                             f"prompts: {{general: {pool}, general_limit: 40, per_trait: 5}}"))
    return spec, pool


def test_a_prompt_pool_in_limas_layout_gives_each_conversations_first_turn(tmp_path, monkeypatch):
    in_api_workdir(tmp_path, monkeypatch)
    lima = [{"conversations": [f"How do I fix bug number {i}?", "You fix it by..."], "source": "stackexchange"}
            for i in range(5)]
    chat = [{"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "What is a monad?"},
                          {"role": "assistant", "content": "A monoid in..."}]}]
    with FakeOpenAIServer(reply=persona_reply) as srv:
        spec, _ = _pool_spec(tmp_path, srv.base_url, lima + chat)
        assert run(str(spec), "prompts", "--cache", str(tmp_path / "cache")) == 0
    prompts = _built_prompts(tmp_path)
    assert {f"How do I fix bug number {i}?" for i in range(5)} <= set(prompts)
    assert "What is a monad?" in prompts and "You fix it by..." not in prompts


def _built_prompts(tmp_path) -> list[str]:
    found = [p for p in (tmp_path / "cache" / "objects").rglob("prompts.jsonl")]
    assert found, "the prompts target wrote no prompts.jsonl"
    return [json.loads(x)["prompt"] for x in found[0].read_text().splitlines()]


@pytest.mark.parametrize("rows, says", [
    ([{"prompt": "fine?"}, {"query": "where?", "answer": "here"}], ":2: no prompt: expected a text column"),
    (b'{"prompt": "fine?"}\n{"prompt": "d\xe9j\xe0 vu?"}\n', ":2: not UTF-8 text"),
])
def test_a_prompt_pool_that_cannot_be_read_names_its_line_and_columns(tmp_path, monkeypatch, capsys, rows, says):
    in_api_workdir(tmp_path, monkeypatch)
    with FakeOpenAIServer(reply=persona_reply) as srv:
        spec, pool = _pool_spec(tmp_path, srv.base_url, rows)
        assert run(str(spec), "prompts", "--cache", str(tmp_path / "cache")) != 0
    err = capsys.readouterr().err
    assert f"{pool}{says}" in err and "Traceback" not in err
    if "no prompt" in says:
        assert "found: query, answer" in err
