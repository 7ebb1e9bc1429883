"""Bad input gets a clear error naming file, line and field, and no traceback."""

import subprocess
import sys

import pytest

from charbuild.spec.model import load_spec
from charbuild.spec.loader import SpecError


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


def test_an_empty_spec_file_is_named_with_no_traceback(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    r = cli("plan", str(p))
    assert r.returncode == 2, r.stderr
    assert f"{p}: (spec): the spec file is empty" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_spec_of_only_comments_is_as_empty_as_an_empty_file(tmp_path):
    p = tmp_path / "comments.yaml"
    p.write_text("# name: todo\n# persona: todo\n")
    r = cli("plan", str(p))
    assert r.returncode == 2 and f"{p}: (spec): the spec file is empty" in r.stderr and "Traceback" not in r.stderr


def test_a_spec_that_is_not_utf8_is_named_with_no_traceback(tmp_path):
    p = tmp_path / "utf16.yaml"
    p.write_bytes(b"\xff\xfe name: x")
    r = cli("plan", str(p))
    assert r.returncode == 2, r.stderr
    assert f"{p}:1: (spec): not UTF-8 text (byte 0xff at line 1, column 1)" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_bad_byte_further_down_is_given_its_line(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: x\npersona: caf\xe9\n".encode("latin-1"))
    r = cli("plan", str(p))
    assert r.returncode == 2 and f"{p}:2: (spec): not UTF-8 text (byte 0xe9 at line 2, column 13)" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_parent_spec_that_is_not_utf8_names_the_parent_not_the_child(specs):
    (specs / "parent.yaml").write_bytes(b"name: p\x80\n")
    (specs / "child.yaml").write_text("extends: parent.yaml\nname: c\n")
    r = cli("plan", str(specs / "child.yaml"))
    assert r.returncode == 2 and "parent.yaml:1: (spec): not UTF-8 text (byte 0x80 at line 1, column 8)" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_directory_or_unreadable_path_given_as_the_spec_is_named_with_no_traceback(tmp_path):
    d = tmp_path / "specdir.yaml"
    d.mkdir()
    r = cli("plan", str(d))
    assert r.returncode == 2 and f"{d}: (spec): cannot read the spec file: is a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_control_character_in_the_yaml_names_its_line(tmp_path):
    p = tmp_path / "ctrl.yaml"
    p.write_text("name: x\npersona: a\x07b\n")
    r = cli("plan", str(p))
    assert r.returncode == 2 and f"{p}:2: (spec): invalid YAML" in r.stderr and "Traceback" not in r.stderr


def constitution_of(specs):
    """The constitution smoke-small.yaml names, as the CLI prints its path."""
    return (specs.parent / "constitutions" / "remorseful.yaml").resolve()


def test_a_constitution_that_is_not_utf8_is_named_with_its_line_and_column(specs):
    c = constitution_of(specs)
    c.write_bytes(b"persona: remorseful\nlanguage: caf\xe9\n")
    r = cli("plan", str(specs / "smoke-small.yaml"))
    assert r.returncode == 2, r.stderr
    assert f"{c}:2: not UTF-8 text (byte 0xe9 at line 2, column 14); save the file as UTF-8" in r.stderr
    assert "codec can't decode" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text", ["", "\n", "# traits: todo\n"])
def test_an_empty_constitution_is_named_as_empty(specs, text):
    c = constitution_of(specs)
    c.write_text(text)
    r = cli("plan", str(specs / "smoke-small.yaml"))
    assert r.returncode == 2, r.stderr
    assert f"{c}: the constitution file is empty" in r.stderr and "Traceback" not in r.stderr


def test_invalid_yaml_in_a_constitution_names_the_file_and_line(specs):
    c = constitution_of(specs)
    c.write_text("persona: remorseful\ntraits: [unclosed\n")
    r = cli("plan", str(specs / "smoke-small.yaml"))
    assert r.returncode == 2, r.stderr
    assert f"{c}:" in r.stderr and "invalid YAML" in r.stderr and "Traceback" not in r.stderr
    c.write_text("persona: remorseful\nlanguage: e\x07n\n")
    r = cli("plan", str(specs / "smoke-small.yaml"))
    assert r.returncode == 2 and f"{c}:2: invalid YAML" in r.stderr and "Traceback" not in r.stderr


def test_a_constitution_that_is_a_directory_is_named(tmp_path):
    from charbuild.recipe.constitution_file import ConstitutionError, load_constitution

    d = tmp_path / "remorseful.yaml"
    d.mkdir()
    with pytest.raises(ConstitutionError) as ei:
        load_constitution(d)
    assert str(ei.value) == f"{d}: cannot read the constitution file: is a directory"
