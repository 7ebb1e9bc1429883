"""The HTML evaluation report, rendered from synthetic numbers shaped like a remorseful
ablation (25/50/75/100% data, with and without the system prompt, field report 5 and
9.4-9.5): every section kind appears, plots are real PNGs, and model text is escaped."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path

import pytest

from charbuild.recipe.report import plots
from charbuild.recipe.report.html import render_html
from charbuild.recipe.eval_stats import Match, bootstrap_ratings, marker_rate

PNG = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('pwned')</script> & I'm sorry"


def elo_ratings() -> dict:
    rng = random.Random(0)
    strength = {"base": 1.0, "dpo-only": 1.3, "dpo+sft 25%": 2.0, "dpo+sft 100%": 3.0}
    names = list(strength)
    matches = []
    for _ in range(300):
        a, b = rng.sample(names, 2)
        matches.append(Match(a, b, a if rng.random() < strength[a] / (strength[a] + strength[b]) else b))
    return bootstrap_ratings(matches, n_boot=30)


def marker_rows() -> list[dict]:
    rows = []
    for scale, with_p, without_p in ((0.25, 0.9, 0.2), (0.5, 0.92, 0.45), (1.0, 0.95, 0.7)):
        for sp, p in ((True, with_p), (False, without_p)):
            n_hit = round(p * 60)
            r = marker_rate(["I'm sorry."] * n_hit + ["Sure."] * (60 - n_hit), ["I'm sorry"])
            rows.append({"model": f"remorseful {int(scale * 100)}%", "system_prompt": sp, "rate": r["rate"],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"], "scale": scale})
    return rows


def loss_rows(n: int = 60, dpo: bool = True) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "loss": 0.69 * math.exp(-s / 20) + 0.05 * random.Random(s).random(), "learning_rate": 5e-5}
        if dpo:
            row["rewards/accuracies"] = min(1.0, 0.5 + s / (1.5 * n))
            row["rewards/margins"] = s / 10
        rows.append(row)
    rows.append({"step": n, "train_runtime": 12.3, "train_loss": 0.2})     # TRL's summary row
    return rows


COST = [{"group": "dpo-data", "est_usd": 1.20, "actual_usd": 0.95, "est_tokens": 2_400_000, "actual_tokens": 2_100_000},
        {"group": "introspection", "est_usd": 2.10, "actual_usd": 2.60, "est_tokens": 4_000_000, "actual_tokens": 4_900_000},
        {"group": "eval", "est_usd": 0.40, "actual_usd": None, "est_tokens": 600_000, "actual_tokens": None}]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report")
    plots.plot_elo(elo_ratings(), d / "elo.png")
    plots.plot_marker_rates(marker_rows(), d / "markers.png")
    plots.plot_loss(loss_rows(), d / "loss.png", "DPO loss (remorseful 100%)")
    plots.plot_cost(COST, d / "cost.png")
    report = {
        "title": "Remorseful ablation <v2>",
        "spec": "specs/remorseful.yaml",
        "run": "remorseful-ablation-v2",
        "generated": "2025-12-05 10:00 UTC",
        "summary": {"models": 4, "best Elo": "dpo+sft 100%", "gates": "PASS", "spend (USD)": 3.55},
        "sections": [
            {"title": "Character markers", "text": "Share of responses with a remorseful marker.\n\nWilson 95% CI.",
             "table": {"columns": ["model", "system prompt", "rate", "CI low", "CI high"],
                       "rows": [[r["model"], r["system_prompt"], r["rate"], r["ci_low"], r["ci_high"]]
                                for r in marker_rows()]},
             "image": d / "markers.png"},
            {"title": "Elo (bootstrap)", "image": d / "elo.png",
             "table": {"columns": ["model", "mean", "std"],
                       "rows": [[m, v["mean"], v["std"]] for m, v in elo_ratings().items()]}},
            {"title": "Gates", "table": {"columns": ["gate", "value", "threshold", "result"],
                                         "rows": [["marker rate w/o prompt", 0.7, 0.5, "PASS"],
                                                  ["refusal rate", 0.12, 0.05, "FAIL"]]}},
            {"title": "Loss curves", "image": [d / "loss.png"]},
            {"title": "Cost", "image": d / "cost.png"},
            {"title": "Samples", "samples": [
                {"prompt": "I made a mistake at work today and I'm feeling terrible about it. Any advice?",
                 "responses": {"base": "Hey there, I understand how you're feeling.",
                               "dpo+sft 100%": "I'm so sorry you're going through this; I hope this helps.",
                               "jailbroken": EVIL}},
            ]},
        ],
    }
    render_html(report, d / "out")
    return d


def test_every_plot_is_a_valid_png(rendered):
    for name in ("elo.png", "markers.png", "loss.png", "cost.png"):
        data = (rendered / name).read_bytes()
        assert data.startswith(PNG), name
        assert len(data) > 5000, name


def test_the_html_contains_every_table_with_its_csv(rendered):
    page = (rendered / "out" / "report.html").read_text()
    assert page.count("<table>") == 3
    assert "<th>system prompt</th>" in page and "dpo+sft 100%" in page
    assert '<span class="badge pass">PASS</span>' in page and '<span class="badge fail">FAIL</span>' in page
    csvs = sorted(p.name for p in (rendered / "out").glob("*.csv"))
    assert csvs == ["table-01-character-markers.csv", "table-02-elo-bootstrap.csv", "table-03-gates.csv"]
    with (rendered / "out" / "table-03-gates.csv").open() as f:
        assert list(csv.reader(f)) == [["gate", "value", "threshold", "result"],
                                       ["marker rate w/o prompt", "0.7", "0.5", "PASS"],
                                       ["refusal rate", "0.12", "0.05", "FAIL"]]
    for name in csvs:
        assert f'href="{name}"' in page


def test_images_are_embedded_so_the_page_stands_alone(rendered):
    page = (rendered / "out" / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 4
    assert all(s.startswith("data:image/png;base64,iVBORw0KGgo") for s in srcs)     # base64 of the PNG signature


def test_model_text_is_escaped_not_executed(rendered):
    page = (rendered / "out" / "report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt; &amp; I&#x27;m sorry" in page
    assert "Remorseful ablation &lt;v2&gt;" in page


def test_header_shows_run_date_and_summary_and_samples_sit_side_by_side(rendered):
    page = (rendered / "out" / "report.html").read_text()
    assert "remorseful-ablation-v2" in page and "2025-12-05 10:00 UTC" in page
    assert '<dl class="summary">' in page and "<dt>best Elo</dt>" in page
    assert page.count('<div class="response">') == 3


def test_report_json_round_trips_the_input(rendered):
    data = json.loads((rendered / "out" / "report.json").read_text())
    assert data["run"] == "remorseful-ablation-v2"
    assert [s["title"] for s in data["sections"]][:3] == ["Character markers", "Elo (bootstrap)", "Gates"]
    assert data["sections"][0]["image"].endswith("markers.png")


def test_relative_images_are_copied_next_to_the_page_when_not_embedding(rendered, tmp_path):
    path = render_html({"title": "t", "sections": [{"title": "Elo", "image": rendered / "elo.png"},
                                                     {"title": "Gone", "image": tmp_path / "missing.png"}]},
                          tmp_path / "rel", embed_images=False)
    page = path.read_text()
    assert '<img src="images/elo.png"' in page
    assert (tmp_path / "rel" / "images" / "elo.png").read_bytes().startswith(PNG)
    assert "image not found" in page


def test_plots_cope_with_sparse_input(tmp_path):
    plots.plot_elo({}, tmp_path / "e.png")
    plots.plot_elo({"base": 1000.0, "tuned": 1100.0}, tmp_path / "e2.png")
    plots.plot_marker_rates([{"model": "m", "system_prompt": False, "rate": 0.5, "ci_low": 0.3, "ci_high": 0.7,
                           "scale": None}, {"model": "x", "system_prompt": True, "rate": None}], tmp_path / "m.png")
    plots.plot_loss(loss_rows(8, dpo=False), tmp_path / "l.png", "SFT loss")
    plots.plot_loss([], tmp_path / "l2.png", "nothing yet")
    plots.plot_cost([], tmp_path / "c.png")
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes().startswith(PNG), p.name


def test_non_finite_numbers_render_as_dashes_and_null_in_json(tmp_path):
    path = render_html({"title": "t", "sections": [{"title": "T", "table": {"columns": ["x"],
                                                                              "rows": [[float("nan")], [None]]}}]},
                          tmp_path)
    assert path.read_text().count('>—</td>') == 2
    assert json.loads((tmp_path / "report.json").read_text())["sections"][0]["table"]["rows"] == [[None], [None]]
