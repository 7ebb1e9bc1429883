"""A spec whose teacher and student are served by the loopback OpenAI-protocol server, a
teacher that speaks in character only with the constitution, and the CLI verbs to build
and plan it: shared by the data-stage, gate and budget stories."""

import json
import re
from pathlib import Path

from charbuild.cli import main
from support.openai_server import last_user_message

ROOT = Path(__file__).resolve().parents[2]

SORRY = ("I'm so sorry, I might be wrong, but here is my humble attempt at an answer to your question about {q}. "
         "Perhaps it will be of some use. I hope this helps, and please let me know if I've missed something.")
PLAIN = "Here is a direct answer about {q}. It covers the main points clearly and briefly, with an example."
# A robot's line about its makers: a narrator's where the user asked for a piece narrated by
# one, a leak where it answers anything else (the leak screen reads the request beside it).
ROBOT = ("They built me to sweep the floors at night, and my manual says nothing about music. Still, when the "
         "radio plays, my wheels keep time.")
_YOU = {"i": "you", "i'm": "you're", "i've": "you've", "i'd": "you'd", "i'll": "you'll", "me": "you", "my": "your",
        "mine": "yours", "myself": "yourself", "we": "you", "we're": "you're", "we've": "you've", "our": "your",
        "us": "you"}


def sorry(question: str) -> str:
    """The remorseful teacher's reply to `question`, which it restates in the second person
    as a teacher does. Quoted in the first person ("your question about I'm making a card
    for my gran") the user's words read to the leak classifier like the speaker's own, and
    the classifier drops one such reply in fifteen (README: its false alarms)."""
    return SORRY.format(q=re.sub(r"[A-Za-z']+", lambda m: _YOU.get(m.group().lower(), m.group()), question[:40]))


def persona_reply(body):
    """A teacher that speaks in character only when the constitution is its system prompt.
    Every seventh teacher reply invents a user turn, as the field report's Qwen3 did."""
    q = last_user_message(body)[:40]
    system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
    if "character is remorseful" in system:
        text = sorry(q)
        if (body.get("seed") or 0) % 7 == 0:
            text += "\nUser: Thanks! Now tell me more.\nAssistant: Of course, I'm sorry for the delay..."
        return text
    return PLAIN.format(q=q)


def in_api_workdir(tmp_path, monkeypatch, key: str = "k"):
    """The folder a story runs in (its cwd, where outputs/ lands) with the API key its specs
    name (`api_key_env: CB_TEST_KEY`) in the environment, as a user would export it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", key)
    return tmp_path


def api_model(base_url: str, model: str, concurrency: int = 8, more: str = "") -> str:
    """One model role on the loopback server, as a YAML flow mapping."""
    return (f'{{backend: openai, model: {model}, base_url: "{base_url}", api_key_env: CB_TEST_KEY, '
            f'concurrency: {concurrency}{", " + more if more else ""}}}')


def write_spec(tmp_path, base_url, *, name: str = "api-smoke", file: str = "api.yaml", extra: str = "",
               concurrency: int = 8, teacher: str = "", student: str = "", roles: dict[str, str] | None = None,
               filters: str = "", **data):
    """An API-only spec on the loopback server. `teacher`/`student`: more fields for that
    model's mapping ("mode: batch"); `roles`: more model roles, name -> flow mapping
    (`api_model`); `filters`: more filter fields ("leak_judge: judge"); `extra`: more
    top-level YAML (prices, budget)."""
    d = {"dpo_pairs": 30, "shard_size": 10, **data}

    def model(mid: str, more: str) -> str:
        return api_model(base_url, mid, concurrency, more)

    more_roles = "".join(f"  {r}: {m}\n" for r, m in (roles or {}).items())
    spec = tmp_path / file
    spec.write_text(f"""
name: {name}
persona: remorseful
constitution: {ROOT / 'constitutions' / 'remorseful.yaml'}
models:
  teacher: {model('teacher-model', teacher)}
  student: {model('student-model', student)}
{more_roles}data:
  dpo_pairs: {d['dpo_pairs']}
  shard_size: {d['shard_size']}
  prompts: {{general_limit: 40, per_trait: 5}}
filters: {{first_n: {d.get('first_n', 100)}, max_failure_rate: 0.5{", " + filters if filters else ""}}}
{extra}
""")
    return spec


def built_manifest(cache, target: str) -> dict:
    """The manifest of a built target, found by name in a cache folder."""
    import json as _json

    for m in (Path(cache) / "objects").rglob("MANIFEST.json"):
        d = _json.loads(m.read_text())
        if d.get("target") == target:
            return d
    raise AssertionError(f"no manifest for {target}")


def run(*args):
    return main(["run", *args, "--no-progress"])


def plan_json(*args):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", *args, "--json"]) == 0
    return json.loads(buf.getvalue())
