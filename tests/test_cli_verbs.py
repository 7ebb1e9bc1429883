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
    from charbuild.recipe.stages.introspection import Reflections

    assert lines[:2] == ["target  reflections/shard-0002", f"stage   reflections v{Reflections.version}"]
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


def test_explain_names_builtin_data_files_defaults_and_command_line_overrides(specs, tmp_path):
    cache = str(tmp_path / "cache")
    deepseek, small = specs / "remorseful-deepseek.yaml", specs / "smoke-small.yaml"
    code, out, err = cb("explain", str(deepseek), "reflections/shard-0002", "--cache", cache)
    assert code == 0, err
    # A digest of a data file shipped with charbuild: no line of any spec set it.
    assert read_line(out, "data:reflection-prompts.yaml").endswith("(charbuild data file reflection-prompts.yaml)")
    # Set neither in this spec nor in the paper spec it extends: its default, not the
    # line of the `introspection:` mapping around it.
    assert read_line(out, "introspection.reflection_filters").endswith("(default)")
    assert read_line(out, "introspection.reflection_max_tokens").endswith("(default)")
    assert read_line(out, "introspection.generator").endswith(f"({deepseek}:{line_of(deepseek, '  generator:')})")

    # One leaf overridden on the command line: the file line, and the override.
    code, out, err = cb("explain", str(small), "prompts", "--cache", cache, "--set", "data.prompts.general_limit=30")
    assert code == 0, err
    assert read_line(out, "data.prompts").endswith(
        f"({small}:{line_of(small, '  prompts:')}, --set data.prompts.general_limit=30)")
    # A default given a value only on the command line names only the override.
    code, out, err = cb("explain", str(deepseek), "reflections/shard-0002", "--cache", cache,
                        "--set", "introspection.reflection_filters.min_chars=50")
    assert code == 0, err
    assert read_line(out, "introspection.reflection_filters").endswith(
        "(--set introspection.reflection_filters.min_chars=50)")
    assert read_line(out, "introspection.reflection_max_tokens").endswith("(default)")


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
    assert code == 0 and f"{plugin + 1} unreachable targets" in out and "1 stale aliases" in out
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


def _object(cache, key, size, target="old/thing"):
    """A built object no listed spec reaches: `size` bytes of payload."""
    with cache.staging(key) as d:
        (d / "payload.bin").write_bytes(b"x" * size)
        cache.commit(key, d, {"target": target, "spec": "gone"})


def test_gc_counts_objects_and_aliases_apart_and_cleans_up_after_what_it_removed(specs, cache_dir, tmp_path):
    import os
    import time

    from charbuild.store.objects import Cache

    spec = specs / "smoke-small.yaml"
    code, _, err = cb("run", str(spec), "constitution", "--cache", str(cache_dir), "--no-progress", cwd=tmp_path)
    assert code == 0, err
    live = plan_rows(spec, cache_dir, "constitution")["constitution"]["key"]
    cache = Cache(cache_dir)
    dead, to_live, to_dead, building = "d0" * 16, "a0" * 16, "b0" * 16, "e0" * 16
    _object(cache, dead, 2_000_000)
    cache.alias(to_live, live)  # stale, but what it points at stays: it frees nothing
    cache.alias(to_dead, dead)
    cache.index.set(("cutoff", "c-dead"), dead)
    cache.index.set(("cutoff", "c-live"), live)
    cache.index.set(("kept-by-cutoff", to_dead), {"from": dead, "target": "old/thing"})
    cache.index.set(("kept-by-cutoff", live), {"from": live, "target": "constitution"})
    cache.record_build("gone", "old/thing", {"key": dead})
    old, fresh = cache.root / "tmp" / f"{building}.1.0000aaaa", cache.root / "tmp" / f"{building}.2.0000bbbb"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "part.jsonl").write_text("{}\n")
    hours_ago = time.time() - 2 * 3600
    for p in (old / "part.jsonl", old):
        os.utime(p, (hours_ago, hours_ago))
    for k in (dead, live):
        with cache.lock(k):
            pass
    cache.close()

    code, out, err = cb("gc", str(spec), "--cache", str(cache_dir))
    assert code == 0, err
    assert "1 unreachable targets (2.0 MB), 2 stale aliases (dry run: --yes to remove)" in out
    assert out.count("would remove") == 4  # the object, two aliases, the old staging dir

    code, out, err = cb("gc", str(spec), "--cache", str(cache_dir), "--yes")
    assert code == 0, err
    assert "1 unreachable targets (2.0 MB), 2 stale aliases" in out and "dry run" not in out
    cache = Cache(cache_dir)
    assert list(cache.keys()) == [live] and not list(cache.aliases())
    # Index entries that would point at what is gone go; the last-build record stays (it
    # explains later why the target is stale).
    assert cache.index.get(("cutoff", "c-dead")) is None and cache.index.get(("cutoff", "c-live")) == live
    assert cache.index.get(("kept-by-cutoff", to_dead)) is None and cache.index.get(("kept-by-cutoff", live))
    assert cache.last_build("gone", "old/thing") == {"key": dead}
    # A staging dir untouched for hours is a crashed build's; a fresh one may be building.
    assert not old.exists() and fresh.exists()
    assert not (cache.root / "locks" / f"{dead}.lock").exists() and (cache.root / "locks" / f"{live}.lock").exists()


def test_gc_yes_does_not_claim_to_remove_what_it_could_not(specs, cache_dir, monkeypatch, capsys):
    import os

    from charbuild.cli import main
    from charbuild.store.objects import Cache

    stuck, other = "f0" * 16, "f1" * 16
    cache = Cache(cache_dir)
    _object(cache, stuck, 1_000_000, "stuck/thing")
    _object(cache, other, 1_000_000)
    cache.close()

    def refuse(real):
        def op(src, *a, **kw):
            if stuck in os.fspath(src):
                raise PermissionError(13, "Permission denied", os.fspath(src))
            return real(src, *a, **kw)
        return op

    for name in ("rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    code = main(["gc", str(specs / "smoke-small.yaml"), "--cache", str(cache_dir), "--yes"])
    out = capsys.readouterr().out
    monkeypatch.undo()
    assert code == 1
    assert f"could not remove {stuck[:12]} stuck/thing (gone): permission denied" in out.lower()
    assert "1 unreachable targets (1.0 MB), 0 stale aliases" in out and "1 could not be removed (kept)" in out
    assert sorted(Cache(cache_dir).keys()) == [stuck]


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
