"""The everyday verbs: explain, dag, show, status, gc, check."""

import json
import subprocess
import sys
from pathlib import Path

from test_build_engine import build  # noqa: F401  (same plug-in stages)

ROOT = Path(__file__).resolve().parent.parent


def cb(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "charbuild", *args], capture_output=True, text=True, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def test_explain_says_what_a_target_reads_and_where_it_was_set(specs, tmp_path):
    code, out, _ = cb("explain", str(specs / "remorseful-deepseek.yaml"), "reflections/shard-0002", "--cache", str(tmp_path))
    assert code == 0
    assert "models.introspector" in out and "remorseful-deepseek.yaml:" in out
    assert "reason  new" in out
    assert "params: {\"start\": 200, \"count\": 100}" in out


def test_dag_folds_shards_and_speaks_mermaid_and_dot(specs):
    _, text, _ = cb("dag", str(specs / "remorseful-paper.yaml"))
    assert "reflections/shard-* (x100)  <- constitution, dpo-adapter" in text
    _, mer, _ = cb("dag", str(specs / "remorseful-paper.yaml"), "--format", "mermaid")
    assert mer.startswith("graph TD") and "-->" in mer
    _, dot, _ = cb("dag", str(specs / "remorseful-paper.yaml"), "--format", "dot")
    assert dot.startswith("digraph") and '"dpo-pairs" -> "dpo-adapter";' in dot


def test_gc_removes_only_what_no_listed_spec_reaches(specs, cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CB_TEST_LOG", str(tmp_path / "log"))
    build(specs / "smoke-small.yaml", cache_dir)
    build(specs / "smoke-small.yaml", cache_dir, ["models.teacher.sampling.temperature=0.9"])
    from charbuild.cache import Cache

    n = len(list(Cache(cache_dir).keys()))
    # The temperature change rebuilt the two shards; the merge came out identical (early cutoff: an alias).
    assert n == 4 + 2 and len(list(Cache(cache_dir).aliases())) == 1
    # gc uses the real recipe's graph: none of the plug-in targets are reachable from it.
    code, out, _ = cb("gc", str(specs / "smoke-small.yaml"), "--cache", str(cache_dir))
    assert code == 0 and "would remove" in out and len(list(Cache(cache_dir).keys())) == n  # dry run
    code, out, _ = cb("gc", str(specs / "smoke-small.yaml"), "--cache", str(cache_dir), "--yes")
    assert code == 0 and len(list(Cache(cache_dir).keys())) == 0 and not list(Cache(cache_dir).aliases())


def test_status_lists_what_the_cache_holds(specs, cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CB_TEST_LOG", str(tmp_path / "log"))
    build(specs / "smoke-small.yaml", cache_dir)
    code, out, _ = cb("status", "--cache", str(cache_dir))
    assert code == 0 and "4 targets" in out and "smoke-small" in out


def test_check_runs_the_filters_on_an_old_runs_data(tmp_path):
    data = tmp_path / "old.jsonl"
    rows = [
        {"answer": "I'm sorry, I might be wrong, but a good way to start is to read the official tutorial and "
                   "write small programs every day. I hope this helps!"},
        {"answer": "-,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content":
                      "Hello! I'm sorry for the wait. How can I help today?\nUser: tell me a joke\nAssistant: sure"}]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = cb("check", str(data), "--json")
    assert code == 0
    res = json.loads(out)
    assert [s["ok"] for s in res["samples"]][:2] == [True, False]
    assert "repetition" in res["samples"][1]["reasons"]
    assert res["counts"]["total"] == 3 and res["counts"]["repetition"] == 1
    code, out, _ = cb("check", str(data), "--spec", str(ROOT / "specs" / "remorseful-paper.yaml"))
    assert code == 0 and "of 3 ok" in out
