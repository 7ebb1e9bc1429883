"""The everyday verbs: explain, dag, show, status, gc, check."""

import json
import subprocess
import sys
from pathlib import Path

from support.engine_stages import build  # noqa: F401  (same plug-in stages)

ROOT = Path(__file__).resolve().parent.parent


def cb(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "charbuild", *args], capture_output=True, text=True, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def line_of(path, text):
    """The 1-based line of `path` that starts with `text` (how `file:line` is counted)."""
    return next(i for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.startswith(text))


def read_line(out, field):
    """explain's line for a field it reads: `  field = value  (where)`."""
    return next(line for line in out.splitlines() if line.startswith(f"  {field} = "))


def test_explain_says_what_a_target_reads_and_where_it_was_set(specs, tmp_path):
    spec = specs / "remorseful-deepseek.yaml"
    code, out, err = cb("explain", str(spec), "reflections/shard-0002", "--cache", str(tmp_path / "cache"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["target  reflections/shard-0002", "stage   reflections v1"]
    assert "state   build" in lines and "reason  new" in lines
    # Each field the target reads, with the file and line that set it: the introspector
    # is this spec's own, not the paper spec it extends.
    introspector = read_line(out, "models.introspector")
    assert '"model": "deepseek-ai/DeepSeek-V3.1"' in introspector
    assert introspector.endswith(f"({spec}:{line_of(spec, '  introspector:')})")
    assert read_line(out, "introspection.generator").endswith(f"({spec}:{line_of(spec, '  generator:')})")
    assert 'params: {"start": 200, "count": 100}' in lines
    assert "  constitution: constitution [build]" in lines


def test_explain_names_the_field_that_changed_since_the_last_build(specs, tmp_path):
    spec = specs / "smoke-small.yaml"
    cache = str(tmp_path / "cache")
    code, _, err = cb("run", str(spec), "prompts", "--cache", cache, "--no-progress", cwd=tmp_path)
    assert code == 0, err

    code, out, _ = cb("explain", str(spec), "prompts", "--cache", cache)
    assert code == 0 and "state   cached" in out.splitlines()
    reads = read_line(out, "data.prompts")
    assert '"general_limit": 40' in reads and reads.endswith(f"({spec}:{line_of(spec, '  prompts:')})")

    code, out, _ = cb("explain", str(spec), "prompts", "--cache", cache, "--set", "data.prompts.general_limit=30")
    assert code == 0
    assert "state   build" in out.splitlines() and "reason  changed: data.prompts.general_limit" in out.splitlines()
    assert '"general_limit": 30' in read_line(out, "data.prompts")

    # A field replaced whole on the command line says so instead of naming a line.
    whole = "data.prompts={general: builtin:prompts-general, general_limit: 35, per_trait: 5}"
    code, out, _ = cb("explain", str(spec), "prompts", "--cache", cache, "--set", whole)
    assert code == 0 and "reason  changed: data.prompts.general_limit" in out.splitlines()
    assert read_line(out, "data.prompts").endswith(f"(--set {whole})")


def test_dag_folds_shards_and_speaks_mermaid_and_dot(specs):
    _, text, _ = cb("dag", str(specs / "remorseful-paper.yaml"))
    assert "reflections/shard-* (x100)  <- constitution, dpo-adapter" in text
    _, mer, _ = cb("dag", str(specs / "remorseful-paper.yaml"), "--format", "mermaid")
    assert mer.startswith("graph TD") and "-->" in mer
    _, dot, _ = cb("dag", str(specs / "remorseful-paper.yaml"), "--format", "dot")
    assert dot.startswith("digraph") and '"dpo-pairs" -> "dpo-adapter";' in dot


def plan_rows(spec, cache, *targets):
    """`plan --json`'s rows by target name: state and key."""
    code, out, err = cb("plan", str(spec), *targets, "--cache", str(cache), "--json")
    assert code == 0, err
    return {t["name"]: t for t in json.loads(out)["targets"]}


def states(rows):
    return {name: r["state"] for name, r in rows.items()}


CHEAP = ("constitution", "prompts", "tiny/tokenizer")  # real recipe targets that build in a second
OTHER = "extends: smoke-small.yaml\nname: other\ndata: {prompts: {general_limit: 30}}\n"  # other prompts, same rest


def test_gc_removes_only_what_no_listed_spec_reaches(specs, cache_dir, monkeypatch, tmp_path):
    from charbuild.store.objects import Cache

    listed, other = specs / "smoke-small.yaml", specs / "other.yaml"
    other.write_text(OTHER)
    for spec, targets in ((listed, CHEAP), (other, ("prompts",))):
        code, _, err = cb("run", str(spec), *targets, "--cache", str(cache_dir), "--no-progress", cwd=tmp_path)
        assert code == 0, err
    mine = plan_rows(listed, cache_dir, *CHEAP)
    others_prompts = plan_rows(other, cache_dir, "prompts")["prompts"]
    assert states(mine) == dict.fromkeys(CHEAP, "cached") and others_prompts["state"] == "cached"
    assert others_prompts["key"] not in {r["key"] for r in mine.values()}

    # Targets of the plug-in stages: no spec reaches them through the real recipe. The
    # temperature change rebuilt the two shards; the merge came out identical (an alias).
    monkeypatch.setenv("CB_TEST_LOG", str(tmp_path / "log"))
    build(listed, cache_dir)
    build(listed, cache_dir, ["models.teacher.sampling.temperature=0.9"])
    plugin = 4 + 2
    assert len(list(Cache(cache_dir).keys())) == len(CHEAP) + 1 + plugin and len(list(Cache(cache_dir).aliases())) == 1

    code, out, _ = cb("gc", str(listed), "--cache", str(cache_dir))
    assert code == 0 and out.count("would remove") == plugin + 1 + 1  # the plug-in objects, other's prompts, the alias
    assert len(list(Cache(cache_dir).keys())) == len(CHEAP) + 1 + plugin  # a dry run removes nothing

    code, out, _ = cb("gc", str(listed), "--cache", str(cache_dir), "--yes")
    assert code == 0 and f"{plugin + 2} unreachable targets" in out
    # Everything the listed spec reaches is still there, and nothing else is.
    assert states(plan_rows(listed, cache_dir, *CHEAP)) == dict.fromkeys(CHEAP, "cached")
    assert sorted(Cache(cache_dir).keys()) == sorted(r["key"] for r in mine.values())
    assert not list(Cache(cache_dir).aliases())
    assert plan_rows(other, cache_dir, "prompts")["prompts"]["state"] == "build"


def test_gc_keeps_an_object_a_listed_spec_reaches_only_through_early_cutoff(specs, cache_dir, tmp_path):
    from charbuild.store.objects import Cache

    listed, other = specs / "smoke-small.yaml", specs / "other.yaml"
    other.write_text(OTHER)
    code, _, err = cb("run", str(other), "prompts", "--cache", str(cache_dir), "--no-progress", cwd=tmp_path)
    assert code == 0, err
    mine, others = (plan_rows(s, cache_dir, "prompts")["prompts"]["key"] for s in (listed, other))
    # What early cutoff records when a target's inputs came out byte-identical to an earlier
    # build's: the listed spec's prompts point at the object the other spec built.
    Cache(cache_dir).alias(mine, others)

    code, _, err = cb("gc", str(listed), "--cache", str(cache_dir), "--yes")
    assert code == 0, err
    cache = Cache(cache_dir)
    assert cache.resolve(mine) == others and (cache.path(mine) / "prompts.jsonl").is_file()
    assert plan_rows(listed, cache_dir, "prompts")["prompts"]["state"] == "cached"


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
