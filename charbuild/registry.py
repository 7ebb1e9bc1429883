"""Stage name -> stage: the built-in recipe, plus plug-ins from the `charbuild.stages`
entry-point group (a new stage is one module and one entry, the engine unchanged)."""

from __future__ import annotations

from .stages.base import Stage


def builtin_stages() -> list[Stage]:
    from .stages.ablation import Ablation
    from .stages.constitution import ConstitutionStage
    from .stages.evals import EvalElo, EvalMarkers, EvalSamples
    from .stages.gate import GateStage
    from .stages.preferences import PreferenceSamples, Preferences
    from .stages.report_stage import ReportStage
    from .stages.introspection import Interactions, Reflections, SftData
    from .stages.pairs import DpoPairs, DpoPairsShard
    from .stages.prompts import PromptsStage
    from .stages.responses import StudentResponses, TeacherResponses
    from .stages.tiny_models import TinyModel, TinyTokenizer
    from .stages.training import DpoAdapter, SftAdapter

    return [ConstitutionStage(), TinyTokenizer(), TinyModel(), PromptsStage(), TeacherResponses(), StudentResponses(),
            DpoPairsShard(), DpoPairs(), DpoAdapter(), Reflections(), Interactions(), SftData(), SftAdapter(), GateStage(),
            EvalSamples(), EvalMarkers(), EvalElo(), PreferenceSamples(), Preferences(), Ablation(), ReportStage()]


def plugin_stages() -> list[Stage]:
    from importlib.metadata import entry_points

    return [ep.load()() for ep in entry_points(group="charbuild.stages")]


def default_stages() -> list[Stage]:
    return builtin_stages() + plugin_stages()
