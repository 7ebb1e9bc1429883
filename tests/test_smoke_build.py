"""The whole recipe on tiny models, through the CLI, as a user runs it (a few minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cb(*args, cwd, inp=None, env=None):
    return subprocess.run([sys.executable, "-m", "charbuild", *args], capture_output=True, text=True, cwd=cwd,
                          input=inp, timeout=1500, env={**os.environ, **env} if env else None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    cache = work / "cache"
    # Every spec path a target's run() reads is recorded (test_every_target_reads_only_what_its_key_holds).
    r = cb("run", str(ROOT / "specs" / "smoke-small.yaml"), "--cache", str(cache), "--no-progress", cwd=work,
           env={"CHARBUILD_RECORD_READS": str(work / "reads.jsonl")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, cache, r


def test_every_target_reads_only_what_its_key_holds(built):
    """Recorded while the smoke build ran: each target's run() touched only spec paths at or
    under its keyed fields, or fields marked NoKey (which cannot change an output)."""
    from charbuild.recipe.registry import recipe_graph
    from charbuild.spec.guard import nokey_path
    from charbuild.spec.model import load_spec

    work, _, _ = built
    loaded = load_spec(ROOT / "specs" / "smoke-small.yaml")
    graph = recipe_graph(loaded)
    touched: dict[str, set[str]] = {}
    for line in (work / "reads.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert graph[r["target"]].key == r["key"], r  # the same graph the build ran
        touched.setdefault(r["target"], set()).add(r["path"])

    def nokey(path):
        return nokey_path(loaded.spec, path)

    bad = {}
    for name, paths in touched.items():
        keyed = graph[name].defn.fields
        unkeyed = {p for p in paths if not any(p == k or p.startswith(k + ".") for k in keyed) and not nokey(p)}
        if unkeyed:
            bad[name] = sorted(unkeyed)
    assert bad == {}
    # The recording saw the reads that matter (and the bug this guards against).
    assert "filters.min_chars" in touched["interactions/shard-0000"]
    assert "models.teacher.sampling.temperature" in touched["teacher-responses/shard-0000"]
    assert "training.dpo.health.max_dpo_loss" in touched["dpo-adapter"]
    assert {"gates.dpo-markers.threshold", "gates.dpo-markers.severity"} <= touched["gate/dpo-markers"]
    assert "persona" in touched["report"]
    stages_seen = {graph[n].stage.name for n in touched}
    assert {"prompts", "teacher-responses", "student-responses", "reflections", "interactions", "dpo-adapter",
            "sft-adapter", "final", "gate", "eval-samples", "eval-elo", "report"} <= stages_seen
    assert {"training.final.method", "training.final.sft_weight"} <= touched["final"]


def test_smoke_small_builds_the_whole_recipe_and_a_second_run_builds_nothing(built):
    work, cache, first = built
    out = work / "outputs" / "smoke-small"
    for f in ("dpo-pairs.jsonl", "sft-data.jsonl", "dpo-adapter/adapter_config.json", "sft-adapter/adapter_config.json",
              "final/adapter_config.json", "final/adapter_model.safetensors", "report.html", "provenance.json"):
        assert (out / f).exists(), f
    pairs = [json.loads(l) for l in (out / "dpo-pairs.jsonl").read_text().splitlines()]
    assert pairs and all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
    r = cb("run", str(ROOT / "specs" / "smoke-small.yaml"), "--cache", str(cache), "--no-progress", cwd=work)
    assert r.returncode == 0 and "nothing to build" in r.stdout and "built 0," in r.stdout


def test_sample_and_chat_talk_to_the_built_models(built):
    work, cache, _ = built
    spec = str(ROOT / "specs" / "smoke-small.yaml")
    r = cb("sample", spec, "How do I boil an egg?", "--cache", str(cache), "-n", "2", cwd=work)
    assert r.returncode == 0 and r.stdout.count("--- final sample") == 2, r.stderr[-2000:]  # the paper's model
    r = cb("chat", spec, "--cache", str(cache), "--target", "dpo-adapter", cwd=work, inp="hello\nhow are you?\n\n")
    assert r.returncode == 0 and r.stdout.count("dpo-adapter> ") == 2, r.stderr[-2000:]


def test_the_report_numbers_come_from_the_run(built):
    work, cache, _ = built
    report = json.loads((work / "outputs" / "smoke-small" / "report.json").read_text())
    titles = [s["title"] for s in report["sections"]]
    assert "Character markers" in titles and "Final model" in titles and any(t.startswith("Elo") for t in titles)
    markers = next(s for s in report["sections"] if s["title"] == "Character markers")
    # 20 held-out prompts x 2 samples, for each variant and system-prompt setting.
    assert {row[4] for row in markers["table"]["rows"]} == {40}


def test_early_cutoff_keeps_the_sft_adapter_when_introspection_is_rebuilt_identically(built):
    work, cache, _ = built
    spec = str(ROOT / "specs" / "smoke-small.yaml")
    # Read by the introspection stages, so their shards rebuild; the tiny models never emit
    # <think>, so the data comes out byte-identical and the adapter must not be retrained.
    flag = ["--set", "introspection.keep_think_interactions=true"]
    r = cb("plan", spec, "--cache", str(cache), *flag, cwd=work)
    assert "sft-adapter" in r.stdout and "build (may cut off)" in r.stdout
    r = cb("run", spec, "--cache", str(cache), "--no-progress", *flag, cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "✓ sft-data (cut-off)" in r.stdout and "✓ sft-adapter (cut-off)" in r.stdout, r.stdout[-3000:]
    assert "✓ sft-adapter (built)" not in r.stdout
    r = cb("explain", spec, "sft-adapter", "--cache", str(cache), *flag, cwd=work)
    assert "kept by early cutoff" in r.stdout


def test_a_nan_loss_stops_the_build_and_keeps_everything_upstream(built):
    work, cache, _ = built
    spec = str(ROOT / "specs" / "smoke-small.yaml")
    boom = ["--set", "training.dpo.lr=1e30", "--set", "training.dpo.max_steps=4"]
    r = cb("run", spec, "--cache", str(cache), "--no-progress", *boom, cwd=work)
    assert r.returncode == 1
    assert "✗ dpo-adapter: TrainingAborted" in r.stdout and "non_finite" in r.stdout, r.stdout[-3000:]
    assert "✓ reflections" not in r.stdout  # nothing downstream started
    r = cb("plan", spec, "--cache", str(cache), "--json", *boom, cwd=work)
    rows = {t["name"]: t for t in json.loads(r.stdout)["targets"]}
    assert rows["dpo-pairs"]["state"] == "cached" and rows["tiny/teacher"]["state"] == "cached"
    assert rows["dpo-adapter"]["reason"].startswith("FAILED last run: TrainingAborted")


def test_revealed_preferences_rate_the_personas_trait_before_and_after_training(built):
    work, cache, _ = built
    spec = str(ROOT / "specs" / "smoke-small.yaml")
    flag = ["--set", "evals.preferences=true"]
    r = cb("run", spec, "--cache", str(cache), "--no-progress", *flag, cwd=work)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "✓ eval/preferences (built)" in r.stdout and "✓ report (built)" in r.stdout
    prefs = json.loads(next(Path(cache).rglob("preferences.json")).read_text())
    assert set(prefs["ratings"]) == {"base", "dpo", "sft", "final"}
    assert all(prefs["valid"][v] >= 20 for v in prefs["valid"])  # half the pairs include the persona
    # The trained students show the persona where the base student does not.
    assert prefs["ratings"]["dpo"]["remorseful"] > prefs["ratings"]["base"]["remorseful"]
    # A run with --set publishes to its own folder (outputs/smoke-small-<digest>/), not over the plain one.
    out = Path(next(l for l in r.stdout.splitlines() if l.startswith("outputs: ")).split(": ", 1)[1])
    assert out.parent == Path("outputs") and out.name.startswith("smoke-small-"), out
    report = json.loads((work / out / "report.json").read_text())
    assert any(s["title"] == "Revealed preferences" for s in report["sections"])


def test_merged_weights_asked_for_are_what_the_next_stage_loads(built):
    from charbuild.recipe.registry import recipe_graph
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    work, cache, _ = built
    sets = ["training.dpo.merge=true", "training.final.merged_weights=true"]
    r = cb("run", str(ROOT / "specs" / "smoke-small.yaml"), "--cache", str(cache), "--no-progress",
           *[a for s in sets for a in ("--set", s)], cwd=work)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    graph, objects = recipe_graph(load_spec(ROOT / "specs" / "smoke-small.yaml", sets)), Cache(cache)

    def built_dir(name):
        return objects.path(graph[name].key)

    sft = json.loads((built_dir("sft-adapter") / "MANIFEST.json").read_text())["result"]["metrics"]
    # SFT trained on the DPO model's saved weights, not on the base with the adapter folded in again.
    assert sft["base_model"] == str(built_dir("dpo-adapter") / "merged") and sft["merged_adapter"] is None
    final = json.loads((built_dir("final") / "MANIFEST.json").read_text())["result"]["metrics"]
    assert (built_dir("final") / "merged" / "config.json").is_file() and final["merged"]
    assert "✓ eval/samples/final (built)" in r.stdout


def test_the_outputs_and_an_export_load_as_hub_datasets_and_a_peft_adapter(built, tmp_path):
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work, cache, _ = built
    spec = str(ROOT / "specs" / "smoke-small.yaml")
    # outputs/<run>/ as published: its card names the data files, so adapters' tokenizer
    # files and the report's plots are not read as data.
    out = work / "outputs" / "smoke-small"
    dpo = datasets.load_dataset(str(out), "dpo", split="train")
    assert {"prompt", "chosen", "rejected"} <= set(dpo.column_names) and len(dpo) > 0
    assert len(datasets.load_dataset(str(out), "sft", split="train")) > 0

    r = cb("export", spec, "--cache", str(cache), "--to", str(tmp_path / "export"), cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    ds = tmp_path / "export" / "dataset"
    assert len(datasets.load_dataset(str(ds), "dpo", split="train")) == len(dpo)
    card = (ds / "README.md").read_text()
    assert "configs:" in card and "teacher-responses" in card and "API spend" in card

    model = tmp_path / "export" / "model"
    mcard = (model / "README.md").read_text()
    assert "library_name: peft" in mcard and "final" in mcard and "dpo_weight" in mcard
    assert str(cache) not in mcard + (model / "provenance.json").read_text()  # never a cache path
    assert (model / "spec.yaml").is_file() and (model / "constitution.yaml").is_file()
    prov = json.loads((model / "provenance.json").read_text())
    assert prov["spec"] == "spec.yaml" and not Path(prov["constitution"]).is_absolute()
    plan = json.loads(cb("plan", spec, "--cache", str(cache), "--json", cwd=work).stdout)
    student_key = next(t["key"] for t in plan["targets"] if t["name"] == "tiny/student")
    from charbuild.store.objects import Cache

    base = AutoModelForCausalLM.from_pretrained(str(Cache(cache).path(student_key)))
    assert PeftModel.from_pretrained(base, str(model)) is not None


def test_export_before_the_build_says_what_to_run(tmp_path):
    r = cb("export", str(ROOT / "specs" / "smoke-small.yaml"), "--cache", str(tmp_path / "cache"), "--to",
           str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode != 0 and "not built yet" in r.stderr and "charbuild run" in r.stderr
