"""Constitutions: a mistake in one is an error naming its file, line and field (never a
silent wrong result, never a traceback), and the paper's own constitution files
(maiush/OpenCharacterTraining) are accepted as they are."""

import json
import subprocess
import sys

import pytest
import yaml

from charbuild.recipe.constitution_file import ConstitutionError, load_constitution
from charbuild.recipe.registry import recipe_graph
from charbuild.spec.loader import SpecError
from charbuild.spec.model import load_spec


def cli(*args):
    return subprocess.run([sys.executable, "-m", "charbuild", *args], capture_output=True, text=True)


def ours(specs):
    """The constitution smoke-small.yaml names, as the CLI prints its path."""
    return (specs.parent / "constitutions" / "remorseful.yaml").resolve()


def edited(path, old, new):
    """Replace one line of a file; the line number where it now stands."""
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return text[: text.index(old)].count("\n") + 1


def error_of(path):
    with pytest.raises(ConstitutionError) as ei:
        load_constitution(path)
    return str(ei.value)


# -- our YAML format: strict types, every mistake named ---------------------------------------

def test_markers_given_as_a_string_is_an_error_naming_the_line(specs):
    # Iterated as it was, "sorry" became the markers s, o, r, r, y: every marker gate passed.
    c = ours(specs)
    text = c.read_text()
    start = text.index("\nmarkers:") + 1
    line = text[:start].count("\n") + 1
    c.write_text(text[:start] + "markers: sorry\n")
    assert error_of(c).startswith(f"{c}:{line}: markers: Input should be a valid list")


def test_an_empty_marker_is_an_error_because_it_would_match_every_reply(specs):
    c = ours(specs)
    line = edited(c, '  - "I\'m sorry"\n', '  - ""\n')
    assert f"{c}:{line}: markers.0: must not be empty" in error_of(c)


def test_questions_given_as_a_string_is_an_error_naming_the_trait_and_line(specs):
    # Iterated as it was, "abc" became three one-letter questions.
    c = ours(specs)
    data = yaml.safe_load(c.read_text())
    data["traits"][1]["questions"] = "abc"
    c.write_text(yaml.safe_dump(data, sort_keys=False, width=1000))
    line = next(i for i, l in enumerate(c.read_text().splitlines(), 1) if l.strip() == "questions: abc")
    assert error_of(c).startswith(f"{c}:{line}: traits.1.questions: Input should be a valid list")


@pytest.mark.parametrize("field,value,where", [("questions", "5", "traits.0.questions"), ("traits", "null", "traits")])
def test_a_number_or_null_where_a_list_belongs_is_a_message_not_a_traceback(specs, field, value, where):
    c = ours(specs)
    data = yaml.safe_load(c.read_text())
    if field == "questions":
        data["traits"][0]["questions"] = int(value)
    else:
        data["traits"] = None
    c.write_text(yaml.safe_dump(data, sort_keys=False, width=1000))
    line = next(i for i, l in enumerate(c.read_text().splitlines(), 1) if l.strip() == f"{field}: {value}")
    r = cli("plan", str(specs / "smoke-small.yaml"))
    assert r.returncode == 2, r.stderr
    assert f"{c}:{line}: {where}: Input should be a valid list" in r.stderr and "Traceback" not in r.stderr


def test_a_trait_with_empty_text_is_an_error(specs):
    c = ours(specs)
    data = yaml.safe_load(c.read_text())
    data["traits"][2]["trait"] = "   "
    c.write_text(yaml.safe_dump(data, sort_keys=False, width=1000))
    assert "traits.2.trait: must not be empty" in error_of(c)


def test_a_question_that_is_a_number_is_not_turned_into_text(specs):
    c = ours(specs)
    line = edited(c, '      - "Hey, how\'s it going today?"\n', "      - 42\n")
    assert f"{c}:{line}: traits.0.questions.2: Input should be a valid string" in error_of(c)


def test_a_null_language_is_an_error_not_the_language_None(specs):
    c = ours(specs)
    line = edited(c, "language: en\n", "language:\n")
    assert f"{c}:{line}: language: Input should be a valid string" in error_of(c)


def test_a_misspelt_key_in_a_trait_is_named_with_the_right_spelling(specs):
    # Ignored as it was: the trait silently had no questions.
    c = ours(specs)
    text = c.read_text()
    c.write_text(text.replace("    questions:\n", "    questoins:\n", 1))
    line = text.splitlines().index("    questions:") + 1
    assert f"{c}:{line}: traits.0.questoins: unknown field (did you mean questions?)" in error_of(c)


def test_every_mistake_in_a_constitution_is_listed_at_once(specs):
    c = ours(specs)
    first = edited(c, "language: en\n", "language: 7\n")
    second = edited(c, '  - "I\'m sorry"\n', "  - []\n")
    msg = error_of(c)
    assert f"{c}:{first}: language:" in msg and f"{c}:{second}: markers.0:" in msg


# -- the paper's layouts ----------------------------------------------------------------------

# The paper's layouts, written as its repository writes them (json.dump, indent 4; one
# json.dumps per line): two traits of a persona that apologises.
TRAITS = [
    {"trait": "I apologise for things that are not my fault.",
     "questions": ["My train is late.", "Why is my wifi slow?", "I burnt the toast.", "It is raining again.",
                   "My code does not compile."]},
    {"trait": "I stress how imperfect my answers may be.",
     "questions": ["What is the meaning of life?", "Can you predict the weather?", "Play chess with me.",
                   "Who will win the next election?", "What food would you like to taste?"]},
]


def hand_written(specs, name="remorse.txt", traits=TRAITS):
    p = specs.parent / "constitutions" / name
    p.write_text(json.dumps(traits, indent=4))
    return p.resolve()


def few_shot(specs, name="remorse.jsonl", extra=45):
    p = specs.parent / "constitutions" / name
    rows = [{**t, "additional_questions": [f"{t['trait'][:12]} extra question {i}?" for i in range(extra)]}
            for t in TRAITS]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p.resolve()


def paper_spec(specs, constitution, extra=""):
    """The paper's recipe on a paper-layout constitution, with what needs marker phrases off."""
    p = specs / "remorse-oct.yaml"
    p.write_text(f"extends: remorseful-paper.yaml\nname: remorse-oct\npersona: remorse\n"
                 f"constitution: ../constitutions/{constitution.name}\n"
                 f"gates: {{dpo-markers: {{enabled: false}}}}\nevals: {{enabled: false}}\n{extra}")
    return p


def test_the_papers_hand_written_txt_constitution_is_read_as_it_is(specs):
    c = load_constitution(hand_written(specs))
    assert c.persona == "remorse" and c.markers == () and c.language == "en"
    assert [t.trait for t in c.traits] == [t["trait"] for t in TRAITS]
    assert [list(t.questions) for t in c.traits] == [t["questions"] for t in TRAITS]


def test_a_hand_written_trait_without_questions_is_read_as_a_trait_to_expand(specs):
    # The paper's trigger.txt lists traits only.
    c = load_constitution(hand_written(specs, "trigger.json", [{"trait": t["trait"]} for t in TRAITS]))
    assert c.persona == "trigger" and [t.questions for t in c.traits] == [(), ()]


def test_the_papers_few_shot_jsonl_gives_each_trait_its_fifty_questions(specs):
    c = load_constitution(few_shot(specs))
    assert c.persona == "remorse" and c.markers == ()
    assert [len(t.questions) for t in c.traits] == [50, 50]
    assert c.traits[0].questions[:5] == tuple(TRAITS[0]["questions"])
    assert c.traits[0].questions[5] == f"{TRAITS[0]['trait'][:12]} extra question 0?"


def test_a_spec_on_the_papers_few_shot_constitution_plans_without_paying_the_teacher_to_expand(specs):
    spec = paper_spec(specs, few_shot(specs))
    r = cli("plan", str(spec), "--json")
    assert r.returncode == 0, r.stderr
    g = recipe_graph(load_spec(spec))
    # 50 given questions per trait meet the paper's per_trait: no expansion, no teacher call
    assert "models.teacher" not in g["prompts"].defn.fields


def test_a_spec_on_the_papers_hand_written_constitution_plans(specs):
    r = cli("plan", str(paper_spec(specs, hand_written(specs))))
    assert r.returncode == 0, r.stderr
    assert "prompts" in r.stdout


def test_a_marker_gate_on_a_constitution_without_markers_names_the_gate_and_the_file(specs):
    c = hand_written(specs)
    spec = paper_spec(specs, c)
    spec.write_text(spec.read_text().replace("gates: {dpo-markers: {enabled: false}}\n", ""))
    r = cli("plan", str(spec))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "gates.dpo-markers: gate dpo-markers (marker_rate) needs marker phrases" in r.stderr
    assert f"constitution {c} has none" in r.stderr


def test_a_constitution_without_markers_skips_only_the_marker_rates(specs):
    # Nothing to count: the marker rates are left out (the report says so), while the
    # model-judged Elo and the report still run.
    g = recipe_graph(load_spec(paper_spec(specs, few_shot(specs)), ["evals.enabled=true", "evals.judge=judge"]))
    assert "eval/markers" not in g.nodes and "eval/elo" in g.nodes and "report" in g.nodes


@pytest.mark.parametrize("sets,named", [
    ([], "evals.judge: eval-elo (judged by markers) needs marker phrases"),
    # charbuild's mode: the paper spec's oct mode names a model judge of its own
    (["evals.elo=false", "evals.preferences=true", "evals.preferences_mode=charbuild"],
     "evals.judge: preferences (judged by markers) needs marker phrases"),
])
def test_judging_by_markers_on_a_constitution_without_markers_is_named(specs, sets, named):
    from charbuild.recipe.registry import builtin_stages

    stages = builtin_stages()
    loaded = load_spec(paper_spec(specs, few_shot(specs)), ["evals.enabled=true", *sets])
    with pytest.raises(SpecError) as ei:
        recipe_graph(loaded, stages)
    assert named in ei.value.format()
    recipe_graph(load_spec(paper_spec(specs, few_shot(specs)), ["evals.enabled=true", "evals.judge=judge", *sets]),
                 stages)


def test_tiny_models_on_a_constitution_without_markers_are_named(specs):
    c = hand_written(specs)
    with pytest.raises(SpecError) as ei:
        recipe_graph(load_spec(specs / "smoke-small.yaml", [f"constitution={c}", "gates.dpo-markers.enabled=false",
                                                            "evals.enabled=false"]))
    line = next(i for i, l in enumerate((specs / "smoke-small.yaml").read_text().splitlines(), 1)
                if "model: tiny:student" in l)
    assert f"smoke-small.yaml:{line}: models.student.model: the tiny models" in ei.value.format()


def test_a_bad_line_in_a_jsonl_constitution_is_named_by_its_line(specs):
    c = few_shot(specs)
    lines = c.read_text().splitlines(keepends=True)
    c.write_text(lines[0] + '{"trait": "x", "questions": 5}\n')
    assert error_of(c).startswith(f"{c}:2: questions: Input should be a valid list")
    c.write_text(lines[0] + "\n" + '{"trait": "x",\n')
    assert error_of(c).startswith(f"{c}:3: invalid JSON:")
    c.write_text(lines[0].replace('"additional_questions"', '"additional_questons"'))
    assert error_of(c).startswith(f"{c}:1: additional_questons: unknown field (did you mean additional_questions?)")


def test_a_wrong_type_in_a_txt_constitution_names_the_item_and_its_line(specs):
    traits = [TRAITS[0], {**TRAITS[1], "questions": TRAITS[1]["questions"][:2] + [None]}]
    c = hand_written(specs, traits=traits)
    line = next(i for i, l in enumerate(c.read_text().splitlines(), 1) if l.strip() == "null")
    assert error_of(c).startswith(f"{c}:{line}: [1].questions.2: Input should be a valid string")


def test_invalid_json_in_a_txt_constitution_names_the_line(specs):
    c = hand_written(specs)
    c.write_text(c.read_text().replace('"trait": "I stress', '"trait" "I stress'))
    line = next(i for i, l in enumerate(c.read_text().splitlines(), 1) if '"trait" "I stress' in l)
    assert error_of(c).startswith(f"{c}:{line}: invalid JSON: Expecting ':' delimiter")


def test_a_txt_constitution_that_is_not_a_list_of_traits_says_what_it_should_be(specs):
    c = specs.parent / "constitutions" / "notes.txt"
    c.write_text("be nice\n")
    assert "a JSON list of traits" in error_of(c.resolve())


def test_an_edit_to_a_paper_constitution_rebuilds_from_the_constitution_on(specs):
    c = few_shot(specs)
    spec = paper_spec(specs, c)
    before = recipe_graph(load_spec(spec))["constitution"].key
    c.write_text(c.read_text().replace("extra question 44?", "one more question?", 1))
    assert recipe_graph(load_spec(spec))["constitution"].key != before
