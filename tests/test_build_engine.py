"""The engine's stories: crash and resume, two runs on one cache, corruption, null plans."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from charbuild.store.objects import Cache
from charbuild.engine.executor import run_build
from charbuild.ledger import BudgetExceeded
from charbuild.engine.graph import build_graph
from charbuild.engine.planner import fast_null_plan, make_plan, memo_id, save_memo
from charbuild.spec.model import load_spec

from support import engine_stages  # noqa: E402
from support.engine_stages import build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def events(log):
    return [l.split()[1] for l in Path(log).read_text().splitlines()] if Path(log).exists() else []


@pytest.fixture
def log(tmp_path, monkeypatch):
    p = tmp_path / "events.log"
    monkeypatch.setenv("CB_TEST_LOG", str(p))
    return p


def test_a_second_run_builds_nothing(specs, cache_dir, log):
    plan, report = build(specs / "smoke-small.yaml", cache_dir)
    assert len(report.built) == len(plan.rows) == 1 + 2 + 1  # source, 2 shards of 4 pairs, merged
    plan2, report2 = build(specs / "smoke-small.yaml", cache_dir)
    assert plan2.to_build == [] and report2.built == []
    assert len(events(log)) == 4


def test_a_crash_mid_build_keeps_finished_shards_and_resume_builds_only_the_rest(specs, cache_dir, log, monkeypatch):
    sets = ["data.dpo_pairs=12"]  # three shards
    monkeypatch.setenv("CB_CRASH_AT", "items/shard-0002")
    _, report = build(specs / "smoke-small.yaml", cache_dir, sets)
    assert "items/shard-0002" in report.failed and "merged" in report.skipped
    assert {"source", "items/shard-0000", "items/shard-0001"} <= set(report.built)
    assert not list((cache_dir / "tmp").iterdir())  # the failed target left no half-written entry
    monkeypatch.delenv("CB_CRASH_AT")
    log.unlink()
    plan, report = build(specs / "smoke-small.yaml", cache_dir, sets)
    assert [r.name for r in plan.to_build] == ["items/shard-0002", "merged"]
    assert events(log) == ["items/shard-0002", "merged"]


def test_ctrl_c_keeps_every_finished_target(specs, cache_dir, log, monkeypatch):
    from support import engine_stages as es

    original = es.Items.run

    def interrupt(self, ctx):
        if ctx.target.name == "items/shard-0001":
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(es.Items, "run", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build(specs / "smoke-small.yaml", cache_dir)
    monkeypatch.setattr(es.Items, "run", original)
    plan, _ = build(specs / "smoke-small.yaml", cache_dir)
    assert [r.name for r in plan.to_build] == ["items/shard-0001", "merged"]


def test_a_corrupted_object_is_detected_and_rebuilt_never_used(specs, cache_dir, log):
    plan, _ = build(specs / "smoke-small.yaml", cache_dir)
    key = next(r.key for r in plan.rows if r.name == "items/shard-0000")
    f = Cache(cache_dir).path(key) / "items.jsonl"
    f.write_text(f.read_text().replace("remorseful", "REMORSEFUL"))  # same size, other content
    _, report = build(specs / "smoke-small.yaml", cache_dir)
    assert report.rebuilt_corrupt == ["items/shard-0000"]
    assert "remorseful-0" in f.read_text()
    assert list((cache_dir / "corrupt").iterdir())  # the bad copy is kept for inspection


def test_two_concurrent_runs_on_one_cache_build_each_target_once(specs, cache_dir, log):
    spec = specs / "smoke-small.yaml"
    spec.write_text(spec.read_text() + "\n")  # same content, both runs share keys
    env = {**os.environ, "CB_SLEEP": "0.4", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    cmd = [sys.executable, str(ROOT / "tests" / "support" / "engine_stages.py"), str(spec), str(cache_dir)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    built = events(log)
    assert sorted(built) == sorted(set(built)) and len(built) == 4  # every target built exactly once
    reports = [json.loads(o[0]) for o in outs]
    assert sum(len(r["built"]) for r in reports) == 4
    assert sum(len(r["waited"]) + len(r["cached"]) for r in reports) == 4


def test_the_run_refuses_to_start_over_budget(specs, cache_dir, log):
    from charbuild.contract import Estimate

    class Pricey(engine_stages.Items):
        def estimate(self, target, ctx):
            return Estimate(usd=5.0)

    loaded = load_spec(specs / "smoke-small.yaml", ["budget.max_usd=6"])
    graph = build_graph(loaded, [engine_stages.Source(), Pricey(), engine_stages.Merge()])
    cache = Cache(cache_dir)
    with pytest.raises(BudgetExceeded, match="over budget.max_usd"):
        run_build(loaded, graph, make_plan(loaded, graph, cache), cache, progress=False, log=lambda s: None, outputs_root=None)
    assert events(log) == []  # nothing was started


def test_plan_explains_which_field_or_input_changed(specs, cache_dir, log):
    build(specs / "smoke-small.yaml", cache_dir)
    loaded = load_spec(specs / "smoke-small.yaml", ["models.teacher.sampling.temperature=0.9"])
    graph = build_graph(loaded, engine_stages.stages())
    plan = make_plan(loaded, graph, Cache(cache_dir))
    reasons = {r.name: r.reason for r in plan.rows}
    assert reasons["source"] == "cached"
    assert reasons["items/shard-0000"] == "changed: models.teacher.sampling.temperature"
    assert reasons["merged"].startswith("input changed: shards")


def test_a_null_plan_is_served_from_the_memo_until_a_file_changes(specs, cache_dir, log):
    p = specs / "smoke-small.yaml"
    plan, _ = build(p, cache_dir)
    loaded = load_spec(p)
    cache = Cache(cache_dir)
    mid = memo_id(p, [], None, None)
    save_memo(cache, mid, loaded, make_plan(loaded, build_graph(loaded, engine_stages.stages()), cache), [])
    fast = fast_null_plan(cache, mid)
    assert fast is not None and fast.fast and [r.key for r in fast.rows] == [r.key for r in plan.rows]
    (specs.parent / "constitutions" / "remorseful.yaml").write_text(
        (specs.parent / "constitutions" / "remorseful.yaml").read_text() + "\n# edited\n")
    assert fast_null_plan(cache, mid) is None  # a dependency changed: full plan
    save_memo(cache, mid, loaded, plan, [])
    Cache(cache_dir).remove(plan.rows[-1].key)
    assert fast_null_plan(cache, mid) is None  # a target vanished: full plan


def test_plan_json_has_the_documented_shape(specs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "charbuild", "plan", str(specs / "remorseful-paper.yaml"), "--scale", "0.25",
                        "--json", "--cache", str(tmp_path / "c")], capture_output=True, text=True, check=True)
    data = json.loads(r.stdout)
    t = data["targets"][0]
    assert set(t) >= {"name", "key", "state", "reason", "est_tokens", "est_usd", "est_gpu_hours"}
    names = [t["name"] for t in data["targets"]]
    assert "reflections/shard-0024" in names and "reflections/shard-0025" not in names  # 2,500 / 100
    total = data["total"]["est_tokens"]["in"] + data["total"]["est_tokens"]["out"]
    # The field report measured ~7M tokens at 25%: the order of magnitude must match.
    assert 3e6 < total < 2e7, total
    assert data["total"]["est_usd"] > 0


def test_estimates_follow_the_spec(specs, tmp_path):
    def total(*sets):
        r = subprocess.run([sys.executable, "-m", "charbuild", "plan", str(specs / "remorseful-paper.yaml"), "--json",
                            "--cache", str(tmp_path / "c"), *sum((["--set", s] for s in sets), [])],
                           capture_output=True, text=True, check=True)
        return json.loads(r.stdout)["total"]

    base = total()
    assert 1.4e7 < base["est_tokens"]["in"] + base["est_tokens"]["out"] < 8e7  # report: ~28M at 100%
    pricier = total("prices.Qwen/Qwen3-235B-A22B-Instruct-2507={input: 10, output: 30}")
    assert pricier["est_usd"] > base["est_usd"]
    fewer = total("data.interactions=0")
    assert fewer["est_tokens"]["in"] < base["est_tokens"]["in"]


def test_plan_never_imports_torch_or_trl(specs, tmp_path):
    code = ("import sys; from charbuild.cli import main; main(['plan', sys.argv[1], '--cache', sys.argv[2]]); "
            "bad = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(specs / "remorseful-paper.yaml"), str(tmp_path / "c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_first_plan_promises_no_cutoff_where_nothing_was_built_before(specs, cache_dir):
    # Cutoff keeps an earlier build; with none, every target is simply new.
    loaded = load_spec(specs / "smoke-small.yaml")
    plan = make_plan(loaded, build_graph(loaded, engine_stages.stages()), Cache(cache_dir))
    assert plan.rows and not any(r.may_cut_off for r in plan.rows)


def test_early_cutoff_keeps_downstream_when_a_rebuild_is_byte_identical(specs, cache_dir, log):
    build(specs / "smoke-small.yaml", cache_dir)
    log.unlink()
    # The items do not depend on the temperature: they are rebuilt (their key changed) but
    # come out identical, so the merge downstream is kept, not rebuilt.
    sets = ["models.teacher.sampling.temperature=0.3"]
    loaded = load_spec(specs / "smoke-small.yaml", sets)
    graph = build_graph(loaded, engine_stages.stages())
    plan = make_plan(loaded, graph, Cache(cache_dir))
    merged = next(r for r in plan.rows if r.name == "merged")
    assert merged.state == "build" and merged.may_cut_off
    _, report = build(specs / "smoke-small.yaml", cache_dir, sets)
    assert sorted(report.built) == ["items/shard-0000", "items/shard-0001"]
    assert report.cut_off == ["merged"]
    assert events(log) == ["items/shard-0000", "items/shard-0001"]
    plan2, _ = build(specs / "smoke-small.yaml", cache_dir, sets)
    assert plan2.to_build == []
    # explain says why it is cached
    r = subprocess.run([sys.executable, "-m", "charbuild", "explain", str(specs / "smoke-small.yaml"), "dpo-pairs",
                        "--cache", str(cache_dir)], capture_output=True, text=True)
    assert r.returncode == 0


def test_a_cut_off_target_whose_object_is_corrupted_is_rebuilt(specs, cache_dir, log):
    build(specs / "smoke-small.yaml", cache_dir)
    sets = ["models.teacher.sampling.temperature=0.3"]
    plan, report = build(specs / "smoke-small.yaml", cache_dir, sets)
    assert report.cut_off == ["merged"]
    key = next(r.key for r in plan.rows if r.name == "merged")
    f = Cache(cache_dir).path(key) / "merged.jsonl"
    f.write_text(f.read_text().replace("remorseful", "REMORSEFUL"))
    _, report = build(specs / "smoke-small.yaml", cache_dir, sets)
    assert report.rebuilt_corrupt == ["merged"] and "remorseful-0" in Cache(cache_dir).path(key).joinpath("merged.jsonl").read_text()
