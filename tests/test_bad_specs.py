"""Bad input gets a clear error naming file, line and field, and no traceback."""

import subprocess
import sys

import pytest

from charbuild.spec import load_spec
from charbuild.specloader import SpecError


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "charbuild", *args], capture_output=True, text=True, cwd=cwd)


def error_of(path, **kw):
    with pytest.raises(SpecError) as ei:
        load_spec(path, **kw)
    return ei.value.format()


def test_a_typo_in_a_key_names_the_file_line_and_field(specs):
    p = specs / "smoke-small.yaml"
    text = p.read_text().replace("    batch_size: 16\n", "    batch_sise: 16\n", 1)
    p.write_text(text)
    line = text.splitlines().index("    batch_sise: 16") + 1
    msg = error_of(p)
    assert f"smoke-small.yaml:{line}: models.teacher.batch_sise: unknown field (did you mean batch_size?)" in msg


def test_a_wrong_type_names_the_field_and_its_line(specs):
    p = specs / "smoke-large.yaml"
    text = p.read_text().replace("dpo_pairs: 150", "dpo_pairs: lots")
    p.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "dpo_pairs: lots" in l)
    msg = error_of(p)
    assert f"smoke-large.yaml:{line}: data.dpo_pairs:" in msg and "integer" in msg


def test_a_missing_constitution_points_at_the_line_that_names_it(specs):
    (specs.parent / "constitutions" / "remorseful.yaml").unlink()
    p = specs / "smoke-small.yaml"
    line = next(i for i, l in enumerate(p.read_text().splitlines(), 1) if l.startswith("constitution:"))
    assert f"smoke-small.yaml:{line}: constitution: constitution file not found" in error_of(p)


def test_a_cycle_in_extends_is_reported(specs):
    (specs / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (specs / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    msg = error_of(specs / "a.yaml")
    assert "cycle in extends: a.yaml -> b.yaml -> a.yaml" in msg


def test_a_duplicated_key_is_an_error_not_a_silent_override(specs):
    p = specs / "dup.yaml"
    p.write_text("extends: smoke-small.yaml\nname: x\nname: y\n")
    assert "dup.yaml:3: name: duplicate key (first set on line 2)" in error_of(p)


def test_a_bad_set_override_is_reported_as_coming_from_the_command_line(specs):
    msg = error_of(specs / "smoke-small.yaml", sets=["training.dpo.lr=fast"])
    assert "--set training.dpo.lr=fast: training.dpo.lr:" in msg


def test_the_cli_prints_errors_without_a_traceback(specs):
    p = specs / "smoke-small.yaml"
    p.write_text(p.read_text().replace("persona: remorseful", "persona: remorseful\npersonality: loud"))
    line = p.read_text().splitlines().index("personality: loud") + 1
    r = cli("plan", str(p))
    assert r.returncode == 2
    assert f"smoke-small.yaml:{line}: personality: unknown field" in r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_yaml_syntax_names_the_line(specs):
    p = specs / "broken.yaml"
    p.write_text("name: x\nmodels: [unclosed\n")
    r = cli("plan", str(p))
    assert r.returncode == 2 and "broken.yaml:" in r.stderr and "invalid YAML" in r.stderr and "Traceback" not in r.stderr


def test_an_unknown_introspection_generator_is_caught(specs):
    msg = error_of(specs / "smoke-small.yaml", sets=["introspection.generator=nobody"])
    assert "introspection.generator 'nobody' is neither dpo-student nor a role" in msg
