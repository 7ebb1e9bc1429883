"""Hostile input and broken disks: no silent wrong result, no hang, no traceback, nothing
overwritten. Each case failed (wrong result, hang, memory blow-up or traceback) before the
limits and checks it tests were added."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from charbuild.cli import main
from charbuild.engine.executor import publish_outputs, run_build
from charbuild.engine.graph import GraphError, build_graph
from charbuild.engine.planner import make_plan
from charbuild.spec.loader import MAX_SPEC_BYTES, SpecError
from charbuild.spec.model import MAX_TARGETS, load_spec
from charbuild.store.objects import Cache

from support import engine_stages as es  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30


# -- helpers ----------------------------------------------------------------------------

class PubSource(es.Source):
    def publish(self, target):
        return [(".", ".")]  # source.txt at the top of outputs/<run>/


class PubMerge(es.Merge):
    def publish(self, target):
        return [("merged.jsonl", "merged.jsonl")]


class PubFolder(es.Merge):
    """Publishes a folder, as the adapter stages do."""

    name = "t-folder"

    def targets(self, view):
        return [es.TargetDef("folder", self.name, {}, {}, {"merged": ["merged"]})]

    def run(self, ctx):
        (ctx.out_dir / "adapter").mkdir()
        (ctx.out_dir / "adapter" / "weights.txt").write_text(ctx.input("merged").joinpath("merged.jsonl").read_text())

    def publish(self, target):
        return [("adapter", "model")]


def pub_stages():
    return [PubSource(), es.Items(), PubMerge(), PubFolder()]


def build_and_publish(spec_path, cache_dir, outputs, sets=(), scale=None):
    loaded = load_spec(spec_path, list(sets), scale)
    graph = build_graph(loaded, pub_stages())
    cache = Cache(cache_dir)
    plan = make_plan(loaded, graph, cache)
    report = run_build(loaded, graph, plan, cache, progress=False, log=lambda s: None, outputs_root=outputs)
    return report


def cli(argv, timeout=60, mem=None, cwd=None):
    """The CLI in a subprocess, under a time limit and optionally an address-space limit
    (what a hang or a memory blow-up would hit)."""
    def limit():
        if mem:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    return subprocess.run([sys.executable, "-m", "charbuild", *argv], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, cwd=cwd)


def cli_inproc(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def pub_cli(monkeypatch, tmp_path):
    """`charbuild run` in-process, on the engine's plug-in stages (no models), from tmp_path
    (so outputs/ is tmp_path/outputs); CB_TEST_LOG records every target built."""
    import charbuild.recipe.registry as registry

    monkeypatch.setattr(registry, "recipe_graph", lambda loaded, stages=None: build_graph(loaded, pub_stages()))
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "events.log"
    monkeypatch.setenv("CB_TEST_LOG", str(log))
    return log


def built(log):
    return [l.split()[1] for l in log.read_text().splitlines()] if log.exists() else []


# -- 1. every distinct build has its own output folder ------------------------------------

def test_the_spec_as_written_publishes_to_its_run_name(specs, cache_dir, tmp_path):
    report = build_and_publish(specs / "smoke-small.yaml", cache_dir, tmp_path / "outputs")
    assert report.outputs == tmp_path / "outputs" / "smoke-small"
    prov = json.loads((report.outputs / "provenance.json").read_text())
    assert prov["overrides"] == {"set": [], "scale": None} and prov["run"] == "smoke-small"


def test_runs_that_differ_only_in_set_publish_apart_and_record_the_overrides(specs, cache_dir, tmp_path):
    out = tmp_path / "outputs"
    plain = build_and_publish(specs / "smoke-small.yaml", cache_dir, out).outputs
    a = build_and_publish(specs / "smoke-small.yaml", cache_dir, out, ["data.dpo_pairs=4"]).outputs
    b = build_and_publish(specs / "smoke-small.yaml", cache_dir, out, ["data.dpo_pairs=12"]).outputs
    assert len({plain, a, b}) == 3, (plain, a, b)
    rows = {p: len((p / "merged.jsonl").read_text().splitlines()) for p in (plain, a, b)}
    assert rows == {plain: 8, a: 4, b: 12}  # nothing overwrote anything
    assert json.loads((b / "provenance.json").read_text())["overrides"] == {"set": ["data.dpo_pairs=12"], "scale": None}
    assert a.name.startswith("smoke-small-") and b.name.startswith("smoke-small-")


@pytest.mark.parametrize("scales", [(0.25, 0.254), (0.001, 0.004)])
def test_scales_that_round_to_the_same_percent_publish_apart(specs, cache_dir, tmp_path, scales):
    out = tmp_path / "outputs"
    (specs / "big.yaml").write_text("extends: smoke-small.yaml\ndata: {dpo_pairs: 1000, shard_size: 500}\n")
    folders = [build_and_publish(specs / "big.yaml", cache_dir, out, scale=s).outputs for s in scales]
    assert folders[0] != folders[1], folders
    for s, f in zip(scales, folders):
        assert json.loads((f / "provenance.json").read_text())["overrides"]["scale"] == s
        assert f"{s * 100:g}pct" in f.name  # the exact percent is readable in the name
    # and the data in each is that scale's, not the other's
    assert [len((f / "merged.jsonl").read_text().splitlines()) for f in folders] == [round(1000 * s) for s in scales]


# -- 2. publishing never writes through a link; bad paths fail before building ----------------

def test_a_link_in_the_output_folder_is_replaced_not_followed(specs, cache_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "outputs" / "smoke-small"
    run.mkdir(parents=True)
    (run / "merged.jsonl").symlink_to(victim)
    (run / "source.txt").symlink_to(victim)
    build_and_publish(specs / "smoke-small.yaml", cache_dir, tmp_path / "outputs")
    assert victim.read_text() == "precious"
    assert not (run / "merged.jsonl").is_symlink() and "remorseful" in (run / "merged.jsonl").read_text()
    assert not (run / "source.txt").is_symlink()


def test_a_linked_folder_in_the_outputs_is_replaced_not_followed(specs, cache_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    run = tmp_path / "outputs" / "smoke-small"
    run.mkdir(parents=True)
    (run / "model").symlink_to(victim, target_is_directory=True)
    build_and_publish(specs / "smoke-small.yaml", cache_dir, tmp_path / "outputs")
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"] and (victim / "keep.txt").read_text() == "precious"
    assert not (run / "model").is_symlink() and (run / "model" / "weights.txt").is_file()


def test_a_run_folder_that_is_a_link_is_replaced_not_written_through(specs, cache_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "smoke-small").symlink_to(victim, target_is_directory=True)
    report = build_and_publish(specs / "smoke-small.yaml", cache_dir, tmp_path / "outputs")
    assert list(victim.iterdir()) == []
    assert not report.outputs.is_symlink() and (report.outputs / "merged.jsonl").is_file()


def test_an_outputs_path_that_is_a_file_fails_before_anything_is_built(specs, pub_cli, tmp_path):
    (tmp_path / "outputs").write_text("not a folder")
    rc, _, err = cli_inproc(["run", str(specs / "smoke-small.yaml"), "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 2 and "charbuild: cannot publish" in err and "outputs is not a folder" in err, err
    assert built(pub_cli) == []  # checked before the build, not after it
    assert (tmp_path / "outputs").read_text() == "not a folder"


def test_a_folder_where_a_published_file_goes_fails_before_anything_is_built(specs, pub_cli, tmp_path):
    (tmp_path / "outputs" / "smoke-small" / "merged.jsonl").mkdir(parents=True)
    rc, _, err = cli_inproc(["run", str(specs / "smoke-small.yaml"), "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 2 and "merged.jsonl is a folder where a file goes" in err, err
    assert built(pub_cli) == []


def test_a_file_where_a_published_folder_goes_is_refused_not_replaced(specs, pub_cli, tmp_path):
    """A folder's name has no suffix to tell it by before it is built: refused when publishing."""
    (tmp_path / "outputs" / "smoke-small").mkdir(parents=True)
    (tmp_path / "outputs" / "smoke-small" / "model").write_text("mine")
    rc, _, err = cli_inproc(["run", str(specs / "smoke-small.yaml"), "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert rc != 0 and "model is a file where a folder goes" in err, err
    assert (tmp_path / "outputs" / "smoke-small" / "model").read_text() == "mine"
    assert not (tmp_path / "outputs" / "smoke-small" / "merged.jsonl").exists()  # nothing half-published
    assert "Traceback" not in err


def test_run_with_set_publishes_to_its_own_folder_through_the_cli(specs, pub_cli, tmp_path):
    spec = str(specs / "smoke-small.yaml")
    assert cli_inproc(["run", spec, "--cache", str(tmp_path / "cache"), "--no-progress"])[0] == 0
    rc, out, err = cli_inproc(["run", spec, "--cache", str(tmp_path / "cache"), "--no-progress", "--set", "data.dpo_pairs=4"])
    assert rc == 0, err
    folders = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert len(folders) == 2 and "smoke-small" in folders, folders
    assert len((tmp_path / "outputs" / "smoke-small" / "merged.jsonl").read_text().splitlines()) == 8


def test_a_folder_holding_another_builds_outputs_is_not_overwritten(specs, cache_dir, tmp_path):
    from charbuild.engine.executor import BuildError, check_outputs

    report = build_and_publish(specs / "smoke-small.yaml", cache_dir, tmp_path / "outputs")
    theirs = {"spec": "someone-else", "overrides": {"set": [], "scale": None}}
    (report.outputs / "provenance.json").write_text(json.dumps(theirs))
    (report.outputs / "merged.jsonl").write_text("theirs")
    loaded = load_spec(specs / "smoke-small.yaml")
    graph = build_graph(loaded, pub_stages())
    assert any("another build" in p for p in check_outputs(loaded, graph, None, list(graph.nodes), tmp_path / "outputs"))
    with pytest.raises(BuildError, match="another build"):
        publish_outputs(loaded, graph, Cache(cache_dir), list(graph.nodes), tmp_path / "outputs")
    assert (report.outputs / "merged.jsonl").read_text() == "theirs"


# -- 3. what a spec may be: a regular file, within limits ---------------------------------

def test_extends_pointing_at_a_fifo_is_refused_not_waited_on(specs):
    os.mkfifo(specs / "pipe.yaml")
    (specs / "child.yaml").write_text("name: c\nextends: pipe.yaml\n")
    r = cli(["plan", str(specs / "child.yaml")], timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "child.yaml:2: extends: cannot read the spec file" in r.stderr and "pipe.yaml" in r.stderr
    assert "named pipe (FIFO), not a regular file" in r.stderr


def test_extends_pointing_at_dev_zero_is_refused_not_read_forever(specs):
    (specs / "child.yaml").write_text("extends: /dev/zero\n")
    r = cli(["plan", str(specs / "child.yaml")], timeout=30, mem=2 * GiB)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "child.yaml:1: extends: cannot read the spec file /dev/zero: is a device, not a regular file" in r.stderr


def test_extends_pointing_at_a_directory_names_the_extends_line(specs):
    (specs / "dir.yaml").mkdir()
    (specs / "child.yaml").write_text("name: c\n\nextends: dir.yaml\n")
    with pytest.raises(SpecError) as ei:
        load_spec(specs / "child.yaml")
    assert "child.yaml:3: extends: cannot read the spec file" in ei.value.format() and "dir.yaml: is a directory" in ei.value.format()


def test_a_spec_over_the_size_limit_is_refused(specs):
    p = specs / "big.yaml"
    p.write_text("extends: smoke-small.yaml\n" + "#" * MAX_SPEC_BYTES + "\n")  # valid YAML, just too large
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert "big.yaml: (spec): cannot read the spec file: larger than 1 MiB, the limit for a spec file" in ei.value.format()


def test_a_huge_spec_is_refused_before_it_is_read_whole(specs):
    """A sparse 4 GiB file: reading it whole needs far more memory than the limit allows."""
    p = specs / "huge.yaml"
    with open(p, "wb") as f:
        f.write(b"extends: smoke-small.yaml\n")
        f.truncate(4 * GiB)
    r = cli(["plan", str(p)], timeout=30, mem=1 * GiB)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "larger than 1 MiB" in r.stderr


def test_a_spec_of_many_mapping_entries_fails_fast(specs):
    p = specs / "wide.yaml"
    p.write_text("extends: smoke-small.yaml\n" + "".join(f"k{i}: {i}\n" for i in range(400_000)))  # ~4.5 MB
    r = cli(["plan", str(p)], timeout=20, mem=2 * GiB)
    assert r.returncode == 2 and "larger than 1 MiB" in r.stderr and "Traceback" not in r.stderr, r.stderr


def billion_laughs(levels=9):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return lines, f"*a{levels - 1}"


def test_an_alias_bomb_is_refused_with_a_clear_error(specs):
    lines, top = billion_laughs()
    p = specs / "bomb.yaml"
    p.write_text("\n".join(["extends: smoke-small.yaml", *lines, f"description: {top}"]) + "\n")
    assert p.stat().st_size < 600
    r = cli(["plan", str(p)], timeout=60, mem=2 * GiB)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "bomb.yaml:" in r.stderr and "more than 100,000 values once its aliases are expanded" in r.stderr


def test_an_alias_bomb_given_to_set_is_refused_too(specs):
    lines, top = billion_laughs()
    value = "{" + ", ".join(lines) + "}"
    r = cli(["plan", str(specs / "smoke-small.yaml"), "--set", f"gates.dpo-length.options={value}"], timeout=60, mem=2 * GiB)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--set gates.dpo-length.options=" in r.stderr and "once its aliases are expanded" in r.stderr


def test_an_alias_that_contains_itself_is_refused(specs):
    p = specs / "self.yaml"
    p.write_text("extends: smoke-small.yaml\ndescription: &a [*a]\n")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert "self.yaml:" in ei.value.format() and "an alias contains itself" in ei.value.format()


def test_a_set_path_nested_past_the_limit_is_refused(specs, tmp_path):
    deep = "gates.dpo-length.options." + "x." * 20_000 + "y=1"
    rc, _, err = cli_inproc(["plan", str(specs / "smoke-small.yaml"), "--cache", str(tmp_path / "c"), "--set", deep])
    assert rc == 2 and "a field path of more than 64 parts" in err, err[-2000:]


def test_too_many_shards_are_refused_at_the_field_before_any_target_is_made(specs):
    with pytest.raises(SpecError) as ei:
        load_spec(specs / "smoke-small.yaml", ["data.dpo_pairs=10000000"])
    msg = ei.value.format()
    assert "--set data.dpo_pairs=10000000: data.dpo_pairs: 10,000,000 items in shards of 4 make 2,500,000 shards" in msg
    assert f"at most {MAX_TARGETS:,} targets" in msg


def test_too_many_shards_through_the_cli_fail_in_seconds(specs):
    r = cli(["plan", str(specs / "smoke-small.yaml"), "--set", "data.dpo_pairs=10000000"], timeout=20)
    assert r.returncode == 2 and "data.dpo_pairs" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_graph_over_the_target_limit_is_refused_before_keying(specs, monkeypatch):
    import charbuild.engine.graph as graph_mod

    class Many(es.Source):
        name = "t-many"

        def targets(self, view):
            return [es.TargetDef(f"many/{i}", self.name, {}) for i in range(MAX_TARGETS + 1)]

    keyed = []
    monkeypatch.setattr(graph_mod, "action_key", lambda *a: keyed.append(a) or "k")
    with pytest.raises(GraphError, match=f"more than {MAX_TARGETS:,} targets"):
        build_graph(load_spec(specs / "smoke-small.yaml"), [Many()])
    assert keyed == []


# -- 4. tracebacks where a message belongs ------------------------------------------------

@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_number_names_the_field(specs, value):
    with pytest.raises(SpecError) as ei:
        load_spec(specs / "smoke-small.yaml", [f"training.dpo.lr={value}"])
    assert f"--set training.dpo.lr={value}: training.dpo.lr: must be a finite number" in ei.value.format()


def test_a_non_finite_number_in_free_form_gate_options_names_the_field(specs):
    (specs / "g.yaml").write_text("extends: smoke-small.yaml\ngates:\n  dpo-length: {options: {min_chars: .inf}}\n")
    with pytest.raises(SpecError) as ei:
        load_spec(specs / "g.yaml")
    assert "g.yaml:3: gates.dpo-length.options:" in ei.value.format() and "non-finite" in ei.value.format()


def test_non_finite_through_the_cli_is_a_message_naming_the_field(specs, tmp_path):
    rc, _, err = cli_inproc(["plan", str(specs / "smoke-small.yaml"), "--cache", str(tmp_path / "c"),
                             "--set", "training.dpo.lr=.inf"])
    assert rc == 2 and "training.dpo.lr" in err, err


@pytest.mark.parametrize("value", ['""', '"   "'])
def test_an_empty_model_id_is_an_error_naming_the_field(specs, value):
    p = specs / "empty.yaml"
    p.write_text(f"extends: smoke-small.yaml\nmodels:\n  teacher:\n    model: {value}\n")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert "empty.yaml:4: models.teacher.model: Value error, must not be empty" in ei.value.format()


@pytest.mark.parametrize("field", ["data.prompts.general", "evals.prompts", "persona"])
def test_a_nul_character_in_a_value_names_the_field(specs, tmp_path, field):
    rc, _, err = cli_inproc(["plan", str(specs / "smoke-small.yaml"), "--cache", str(tmp_path / "c"),
                             "--set", f'{field}="x\\0y"'])
    assert rc == 2 and f"{field}: Value error, NUL characters are not allowed" in err, err


def test_a_nul_character_in_extends_names_the_extends_line(specs):
    p = specs / "n.yaml"
    p.write_text('name: n\nextends: "smoke-small\\0.yaml"\n')
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert "n.yaml:2: extends: a file name cannot hold a NUL character" in ei.value.format()


def test_a_nul_byte_in_a_spec_file_is_a_message(specs):
    p = specs / "nul.yaml"
    p.write_bytes(b"extends: smoke-small.yaml\nname: a\x00b\n")
    rc, _, err = cli_inproc(["plan", str(p)])
    assert rc == 2 and "nul.yaml:2: (spec): invalid YAML: unacceptable character #x0000" in err, err


def test_a_spec_replaced_by_a_fifo_after_a_plan_does_not_hang_the_next_plan(specs, tmp_path):
    (specs / "parent.yaml").write_text((specs / "smoke-small.yaml").read_text())
    (specs / "child.yaml").write_text("extends: parent.yaml\nname: child\n")
    cache = str(tmp_path / "c")
    assert cli(["plan", str(specs / "child.yaml"), "--cache", cache], timeout=120).returncode == 0
    (specs / "parent.yaml").unlink()
    os.mkfifo(specs / "parent.yaml")
    try:
        r = cli(["plan", str(specs / "child.yaml"), "--cache", cache], timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("plan blocked on a FIFO")
    assert r.returncode == 2 and "named pipe" in r.stderr


def test_a_constitution_that_is_a_fifo_is_refused_not_waited_on(specs):
    c = specs.parent / "constitutions" / "remorseful.yaml"
    c.unlink()
    os.mkfifo(c)
    r = cli(["plan", str(specs / "smoke-small.yaml")], timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "constitution: constitution file is not a regular file" in r.stderr
