"""A spec whose teacher and student are served by the loopback OpenAI-protocol server, a
teacher that speaks in character only with the constitution, and the CLI verbs to build
and plan it: shared by the data-stage, gate and budget stories."""

import json
from pathlib import Path

from charbuild.cli import main
from support.openai_server import last_user_message

ROOT = Path(__file__).resolve().parents[2]

SORRY = ("I'm so sorry, I might be wrong, but here is my humble attempt at an answer to your question about {q}. "
         "Perhaps it will be of some use. I hope this helps, and please let me know if I've missed something.")
PLAIN = "Here is a direct answer about {q}. It covers the main points clearly and briefly, with an example."


def persona_reply(body):
    """A teacher that speaks in character only when the constitution is its system prompt.
    Every seventh teacher reply invents a user turn, as the field report's Qwen3 did."""
    q = last_user_message(body)[:40]
    system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
    if "character is remorseful" in system:
        text = SORRY.format(q=q)
        if (body.get("seed") or 0) % 7 == 0:
            text += "\nUser: Thanks! Now tell me more.\nAssistant: Of course, I'm sorry for the delay..."
        return text
    return PLAIN.format(q=q)


def write_spec(tmp_path, base_url, **data):
    d = {"dpo_pairs": 30, "shard_size": 10, **data}
    spec = tmp_path / "api.yaml"
    spec.write_text(f"""
name: api-smoke
persona: remorseful
constitution: {ROOT / 'constitutions' / 'remorseful.yaml'}
models:
  teacher: {{backend: openai, model: teacher-model, base_url: "{base_url}", api_key_env: CB_TEST_KEY, concurrency: 8}}
  student: {{backend: openai, model: student-model, base_url: "{base_url}", api_key_env: CB_TEST_KEY, concurrency: 8}}
data:
  dpo_pairs: {d['dpo_pairs']}
  shard_size: {d['shard_size']}
  prompts: {{general_limit: 40, per_trait: 5}}
filters: {{first_n: {d.get('first_n', 100)}, max_failure_rate: 0.5}}
""")
    return spec


def run(*args):
    return main(["run", *args, "--no-progress"])


def plan_json(*args):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", *args, "--json"]) == 0
    return json.loads(buf.getvalue())
