"""`plan` as a user reads it: one line per sharded target (every shard with --all), and
figures that agree with each other."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from charbuild.cli import main
from charbuild.recipe.estimates import Calibration, generation
from charbuild.spec.model import ModelSpec
from charbuild.spec.prices import PriceTable

ROOT = Path(__file__).resolve().parent.parent


def _plan(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["plan", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_plan_shows_one_line_per_sharded_target_and_every_shard_with_all(tmp_path, capsys):
    spec = ROOT / "specs" / "remorseful-paper.yaml"
    short = _plan(capsys, spec, "--cache", tmp_path)
    assert "reflections/shard-* (100 shards)" in short and "reflections/shard-0042" not in short
    every = _plan(capsys, spec, "--cache", tmp_path, "--all")
    assert "reflections/shard-0042" in every and "shard-*" not in every
    # The grouped table adds up to the same totals.
    total = [ln.split() for ln in short.splitlines() if ln.startswith("TOTAL")]
    assert total == [ln.split() for ln in every.splitlines() if ln.startswith("TOTAL")]
    assert len(short.splitlines()) < len(every.splitlines()) - 100


def test_the_p90_of_a_plan_is_never_below_its_point_estimate():
    # Older runs wrote long replies (the mean over all calls), recent ones short (the kept
    # distribution): the range must still contain the point estimate.
    stats = {"teacher-responses|m": {"calls": 10, "tokens_in": 500, "tokens_out": 1000, "outs": [10] * 10}}
    ctx = SimpleNamespace(calibration=Calibration(stats), prices=PriceTable.load())
    m = ModelSpec(backend="openai", model="m", base_url="https://api.example.com/v1")
    est = generation(ctx, m, "teacher-responses", 4, 50, 100)
    assert est.tokens_out == 400
    assert est.tokens_out_p90 >= est.tokens_out and est.usd_p90 >= est.usd
