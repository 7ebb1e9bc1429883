"""Stage name -> stage: the built-in recipe, plus plug-ins from the `charbuild.stages`
entry-point group (a new stage is one module and one entry, the engine unchanged)."""

from __future__ import annotations

from charbuild.contract import Stage


def builtin_stages() -> list[Stage]:
    from charbuild.recipe.stages.ablation import Ablation
    from charbuild.recipe.stages.constitution import ConstitutionStage
    from charbuild.recipe.stages.evals import EvalElo, EvalMarkers, EvalSamples
    from charbuild.recipe.stages.gates import GateStage
    from charbuild.recipe.stages.preferences import PreferenceSamples, Preferences
    from charbuild.recipe.stages.report import ReportStage
    from charbuild.recipe.stages.introspection import Interactions, Reflections, SftData
    from charbuild.recipe.stages.pairs import DpoPairs, DpoPairsShard
    from charbuild.recipe.stages.prompts import PromptsStage
    from charbuild.recipe.stages.responses import StudentResponses, TeacherResponses
    from charbuild.recipe.stages.tiny_models import TinyModel, TinyTokenizer
    from charbuild.recipe.stages.adapters import DpoAdapter, SftAdapter
    from charbuild.recipe.stages.final import FinalModel
    from charbuild.recipe.stages.card import DatasetCard

    return [ConstitutionStage(), TinyTokenizer(), TinyModel(), PromptsStage(), TeacherResponses(), StudentResponses(),
            DpoPairsShard(), DpoPairs(), DpoAdapter(), Reflections(), Interactions(), SftData(), SftAdapter(),
            FinalModel(), GateStage(),
            EvalSamples(), EvalMarkers(), EvalElo(), PreferenceSamples(), Preferences(), Ablation(), ReportStage(), DatasetCard()]


def plugin_stages() -> list[Stage]:
    from importlib.metadata import entry_points

    return [ep.load()() for ep in entry_points(group="charbuild.stages")]


def default_stages() -> list[Stage]:
    return builtin_stages() + plugin_stages()


def recipe_graph(loaded, stages: list[Stage] | None = None):
    """The build graph of a spec: the recipe's stages (and plug-ins), keyed by the engine."""
    from charbuild.engine.graph import build_graph

    return build_graph(loaded, stages if stages is not None else default_stages())
