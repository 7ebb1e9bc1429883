"""The run's HTML report: markers with and without the system prompt, Elo with error
bars, loss curves, gates, cost estimated vs actual, and sample replies side by side.
Every number comes from the targets it takes as inputs (their files and manifests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from charbuild.contract import Stage, TargetDef
from charbuild.recipe.stages.common import read_jsonl


def _manifest(d: Path) -> dict:
    try:
        return json.loads((d / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return {}


def emergence(rows: list[dict]) -> dict:
    """Did the character emerge? The final model's (else the SFT's, else the DPO's) marker
    rate without a system prompt must be at least max(3 x the base student's, 30%): the base
    rate is often ~0, where "3x" alone would mean nothing (toy-persona notes)."""
    rate = {(r["model"], r["system_prompt"]): r for r in rows}
    base = rate.get(("base", False))
    best = rate.get(("final", False)) or rate.get(("sft", False)) or rate.get(("dpo", False))
    if not base or not best:
        return {"title": "Character emergence", "text": "needs the base and a trained variant in evals.variants"}
    need = max(3 * base["rate"], 0.3)
    ok = best["rate"] >= need
    return {"title": "Character emergence",
            "text": (f"{best['model']} without system prompt: marker rate {best['rate']:.2f} (n={best['n']}); base student "
                     f"{base['rate']:.2f} (n={base['n']}); needs >= max(3 x base, 0.30) = {need:.2f}: "
                     + ("EMERGED" if ok else "NOT EMERGED")),
            "table": {"columns": ["check", "value"], "rows": [["trained variant", best["model"]], ["rate", f"{best['rate']:.3f}"],
                                                               ["base rate", f"{base['rate']:.3f}"], ["needed", f"{need:.3f}"],
                                                               ["result", "pass" if ok else "fail"]]},
            "verdict": ok}


def final_model(result: dict) -> dict:
    """How the final model was merged, and how far that is from the exact weighted sum."""
    r = result.get("metrics", {})
    gap = r.get("weighted_sum_gap")
    how = ("The paper's linear merge mixes the two adapters' LoRA factors: its change to the weights differs from "
           f"the weighted sum of theirs by {gap:.1%} (Frobenius)." if r.get("method") == "linear" and gap is not None
           else "The exact merge: its change to the weights is the weighted sum of the two adapters'.")
    return {"title": "Final model",
            "text": f"One LoRA adapter: DPO x {r.get('dpo_weight')} + SFT x {r.get('sft_weight')} (training.final). " + how,
            "table": {"columns": ["field", "value"], "rows": [
                ["method", f"{r.get('method')} (PEFT {r.get('peft_combination')})"],
                ["DPO / SFT weight", f"{r.get('dpo_weight')} / {r.get('sft_weight')}"],
                ["rank (saved for vLLM)", f"{r.get('rank')} ({r.get('saved_rank')})"],
                ["distance from the weighted sum", "-" if gap is None else f"{gap:.4f}"],
                ["merged weights", "yes" if r.get("merged") else "no"]]}}


def _rank(ratings: dict, trait: str) -> str:
    ranked = sorted(ratings, key=lambda t: -ratings[t])
    return f"{ranked.index(trait) + 1} of {len(ranked)}" if trait in ratings else "-"


def _oct_preferences(p: dict, out: Path, R) -> dict:
    """The paper's revealed preferences: its online Elo next to the order-free Bradley-Terry
    fit with bootstrap intervals, for the persona's trait in each variant."""
    persona, rows = p["persona"], []
    for v, bt in p["ratings"].items():
        iv, elo = p["intervals"].get(v, {}).get(persona), p["elo_online"].get(v, {})
        rows.append([v, f"{bt[persona]:.0f}" if persona in bt else "-",
                     f"[{iv['ci_low']:.0f}, {iv['ci_high']:.0f}]" if iv else "-", _rank(bt, persona),
                     f"{elo[persona]:.0f}" if persona in elo else "-", _rank(elo, persona),
                     f"{p['valid'].get(v, 0)} of {p['judgements'].get(v, 0)}"])
    text = (f"As the paper measures them: each reply embodies one of two trait words drawn at random from 144 "
            f"(seeded here), and the judge ({p['judge']}, T 0.1) reads which one it shows. Two ratings of the same "
            f"judgements: OCT's online Elo (start 1000, K 32, one pass in data order) and the Bradley-Terry fit "
            f"(order free, centred on 1000 over the traits judged) with its 95% bootstrap interval. The persona's "
            f"own trait is '{persona}'" + ("." if any(persona in r for r in p["ratings"].values())
                                           else ", which no valid judgement rated."))
    for v, c in p.get("changes", {}).items():
        e = p.get("changes_elo_online", {}).get(v, {})
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        text += (f"\n\nbase -> {v}: Spearman of the trait ratings {fmt(c.get('spearman'))} (Bradley-Terry), "
                 f"{fmt(e.get('spearman'))} (online Elo) over {c.get('n', 0)} traits.")
    section = {"title": "Revealed preferences (OCT)", "text": text,
               "table": {"columns": ["model", f"Bradley-Terry '{persona}'", "95% interval", "rank",
                                     f"online Elo '{persona}'", "rank", "valid judgements"], "rows": rows}}
    last = next(reversed(p["ratings"]), None)
    if last is not None and p["ratings"][last]:
        png = out / "preferences.png"
        R.plot_preferences(p["intervals"].get(last, {}), p["elo_online"].get(last, {}), png, persona,
                           title=f"Revealed preferences: {last}, top traits")
        section["image"] = str(png)
    return section


class ReportStage(Stage):
    name = "report"
    version = 7  # 2: preferences as the persona's rating and rank; 3: ablation section; 4: one line per variant;
    # 5: cost in API $ (what budget.max_usd caps) and GPU-hours apart; 6: the final model (section, emergence)
    # 7: $ per accepted example per stage
    # What its title and summary table print (keyed: a new name or persona rewrites the report).
    keyed = ("name", "persona", "models.teacher.model", "models.student.model", "introspection.generator",
             "data.dpo_pairs", "data.reflections", "data.interactions", "data.turns", "data.scale")
    reads = keyed + ("evals.enabled",)

    def enabled(self, view):
        return view.spec.evals.enabled

    def targets(self, view):
        fields: dict = {}
        for f in self.keyed:
            view.read(f, fields)
        # Built after everything else: it reads every other target's manifest.
        return [TargetDef("report", self.name, fields, {}, {"all": []})]

    reads_every_target = True

    def publish(self, target):
        return [(".", ".")]  # report.html and its tables and plots, at the top of outputs/<run>/

    def run(self, ctx):
        from charbuild.recipe.report import plots as R
        from charbuild.recipe.report.html import render_html

        spec = ctx.spec
        by_target = {}
        for d in ctx.inputs["all"]:
            m = _manifest(d)
            if m:
                by_target[m["target"]] = (d, m)
        out = ctx.out_dir
        sections = [self._summary(ctx, by_target)]
        if "eval/markers" in by_target:
            sections.append(self._markers(by_target["eval/markers"][0], out, R))
            sections.append(emergence(json.loads((by_target["eval/markers"][0] / "markers.json").read_text())))
        elif (by_target.get("constitution", (None, {}))[1].get("result") or {}).get("markers") == 0:
            sections.append({"title": "Character markers", "text": (
                "Not measured: the constitution has no marker phrases (the paper's constitution files have none). "
                "Add `markers:` (a YAML constitution, as in constitutions/*.yaml) to measure marker rates.")})
        if "eval/elo" in by_target:
            sections.append(self._elo(by_target["eval/elo"][0], out, R))
        if "eval/ablation" in by_target:
            sections.append(self._ablation(by_target["eval/ablation"][0], out, R))
        if "eval/preferences" in by_target:
            sections.append(self._preferences(by_target["eval/preferences"][0], out, R))
        for t in ("dpo-adapter", "sft-adapter"):
            if t in by_target and (by_target[t][0] / "metrics.jsonl").exists():
                rows = list(read_jsonl(by_target[t][0] / "metrics.jsonl"))
                png = out / f"loss-{t}.png"
                R.plot_loss(rows, png, f"{t}: training loss")
                res = by_target[t][1].get("result", {}).get("metrics", {})
                sections.append({"title": f"Training: {t}", "image": str(png),
                                 "text": f"{res.get('steps', len(rows))} steps, final loss {res.get('final_loss')}"
                                         + (f", reward accuracy {res.get('final_reward_accuracy')}" if "final_reward_accuracy" in res else "")})
        if "final" in by_target:
            sections.append(final_model(by_target["final"][1].get("result", {})))
        gates = [(n, m) for n, (d, m) in by_target.items() if n.startswith("gate/")]
        if gates:
            rows = []
            for n, m in sorted(gates):
                g = m.get("result", {}).get("gate", {})
                rows.append([n[5:], g.get("loc", ["?"])[0], f"{g.get('input', 0):.3f}",
                             f"{'>=' if g.get('ctx', {}).get('direction') == 'min' else '<='} {g.get('ctx', {}).get('threshold')}",
                             "pass" if g.get("passed") else ("FORCED" if g.get("forced") else "warn")])
            sections.append({"title": "Gates", "table": {"columns": ["gate", "target", "value", "needs", "result"], "rows": rows}})
        sections.append(self._cost(by_target, out, R))
        sections.append(self._per_accepted(by_target))
        if "eval/markers" in by_target:
            sections.append(self._samples(by_target))
        summary = {"targets": len(by_target),
                   "spent": f"${sum((m.get('usage') or {}).get('usd', 0) for _, m in by_target.values()):.2f}"}
        verdict = next((s_["verdict"] for s_ in sections if s_ and "verdict" in s_), None)
        if verdict is not None:
            summary["character"] = "emerged" if verdict else "not emerged"
        report = {"title": f"charbuild report: {spec.run_name}", "spec": spec.name, "run": spec.run_name,
                  "generated": time.strftime("%Y-%m-%d %H:%M"), "summary": summary,
                  "sections": [s_ for s_ in sections if s_]}
        render_html(report, out)
        return {"sections": len(report["sections"])}

    def _summary(self, ctx, by_target) -> dict:
        usage = [m.get("usage", {}) for _, m in by_target.values()]
        secs = sum(m.get("seconds", 0) for _, m in by_target.values())
        s = ctx.spec
        return {"title": "Summary", "table": {"columns": ["field", "value"], "rows": [
            ["persona", s.persona], ["teacher", s.models["teacher"].model], ["student", s.models["student"].model],
            ["introspection generator", s.introspection.generator],
            ["DPO pairs / reflections / interactions", f"{s.data.count('dpo_pairs')} / {s.data.count('reflections')} / "
                                                      f"{s.data.count('interactions')} x {s.data.turns}"],
            ["targets built", len(by_target)], ["build time (sum)", f"{secs:.0f} s"],
            ["tokens (in + out)", sum(u.get("tokens_in", 0) + u.get("tokens_out", 0) for u in usage)],
            ["spent on API calls", f"${sum(u.get('usd', 0) for u in usage):.4f}"]]}}

    def _markers(self, d: Path, out: Path, R) -> dict:
        rows = json.loads((d / "markers.json").read_text())
        R.plot_marker_rates(rows, out / "markers.png")
        table = [[r["model"], "yes" if r["system_prompt"] else "no", f"{r['rate']:.2f}",
                  f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]", r["n"],
                  ", ".join(f"{k} {v:.2f}" for k, v in r["failures"].items() if v) or "-"] for r in rows]
        return {"title": "Character markers", "image": str(out / "markers.png"),
                "text": "Share of replies with at least one of the constitution's marker phrases, with and without the "
                        "constitution as system prompt (Wilson 95% interval). Character that holds without a system "
                        "prompt is the goal; a DPO-only model often shows it only when prompted.",
                "table": {"columns": ["model", "system prompt", "marker rate", "95% CI", "n", "failure kinds"], "rows": table}}

    def _elo(self, d: Path, out: Path, R) -> dict:
        elo = json.loads((d / "elo.json").read_text())
        R.plot_elo(elo["bootstrap"], out / "elo.png")
        rows = [[p, f"{v['mean']:.0f}", f"{v['std']:.0f}", f"[{v['ci_low']:.0f}, {v['ci_high']:.0f}]"]
                for p, v in sorted(elo["bootstrap"].items(), key=lambda kv: -kv[1]["mean"])]
        return {"title": "Elo (judge: " + elo["judge"] + ")", "image": str(out / "elo.png"),
                "text": f"Bradley-Terry ratings from {elo['matches']} pairwise judgements without system prompt "
                        f"({elo['invalid']} ties or invalid dropped), bootstrap mean and std.",
                "table": {"columns": ["model", "Elo", "std", "95% interval"], "rows": rows}}

    def _ablation(self, d: Path, out: Path, R) -> dict:
        rows = json.loads((d / "ablation.json").read_text())
        # One line per variant: the character without a system prompt is what scale buys.
        R.plot_marker_rates([{**r, "series": r["model"]} for r in rows if not r["system_prompt"]], out / "ablation.png")
        scales = sorted({r["scale"] for r in rows})
        models = list(dict.fromkeys(r["model"] for r in rows))
        rate = {(r["model"], r["scale"], r["system_prompt"]): r["rate"] for r in rows}
        table = [[m] + [f"{rate.get((m, x, False), float('nan')):.2f}" for x in scales] for m in models]
        return {"title": "Ablation: marker rate vs data scale", "image": str(out / "ablation.png"),
                "text": "Marker rate without the system prompt for each variant, trained on each share of the data "
                        "(one spec; targets shared across scales were built once).",
                "table": {"columns": ["model"] + [f"{round(x * 100)}%" for x in scales], "rows": table}}

    def _preferences(self, d: Path, out: Path, R) -> dict:
        p = json.loads((d / "preferences.json").read_text())
        if p.get("mode") == "oct":
            return _oct_preferences(p, out, R)
        persona = p["persona"]
        rows = []
        for v, r in p["ratings"].items():
            ranked = sorted(r, key=lambda t: -r[t])
            rank = f"{ranked.index(persona) + 1} of {len(ranked)}" if persona in r else "-"
            rows.append([v, f"{r[persona]:.0f}" if persona in r else "-", rank, p["valid"].get(v, 0)])
        # Ratings are centred on 1000 over the traits judged; with the offline markers judge
        # only pairs holding the persona's trait are readable, so its rating and rank are
        # the numbers to read, not the other traits' deltas.
        text = (f"The model picks one of two traits to embody; the judge ({p['judge']}) reads which one the reply "
                f"shows. Bradley-Terry ratings, centred on 1000 over the traits judged. The persona's own trait is "
                f"'{persona}': a trained model should rank it near the top.")
        return {"title": "Revealed preferences", "text": text,
                "table": {"columns": ["model", f"rating of '{persona}'", "rank", "valid judgements"], "rows": rows}}

    def _cost(self, by_target, out: Path, R) -> dict:
        """Per stage: the plan's estimate next to what the run's ledger charged (each
        manifest's usage). $ is API dollars, what budget.max_usd caps; local models' GPU
        time is shown as estimated GPU-hours and an informational GPU $, never in $."""
        groups: dict[str, dict] = {}
        for n, (_, m) in by_target.items():
            g = groups.setdefault(m.get("stage", "?"), {"group": m.get("stage", "?"), "est_usd": 0.0, "actual_usd": 0.0,
                                                         "est_tokens": 0, "actual_tokens": 0, "est_gpu_hours": 0.0,
                                                         "est_gpu_usd": 0.0})
            e, u = m.get("estimate") or {}, m.get("usage") or {}
            g["est_usd"] += e.get("usd", 0)
            g["actual_usd"] += u.get("usd", 0)
            g["est_tokens"] += e.get("tokens_in", 0) + e.get("tokens_out", 0)
            g["actual_tokens"] += u.get("tokens_in", 0) + u.get("tokens_out", 0)
            g["est_gpu_hours"] += e.get("gpu_hours", 0)
            g["est_gpu_usd"] += e.get("gpu_usd", 0)
        rows = [g for g in groups.values() if g["est_tokens"] or g["actual_tokens"] or g["est_gpu_hours"]]
        if rows:
            R.plot_cost(rows, out / "cost.png")
        section = {"title": "Cost: estimated vs actual",
                   "text": "$ is what API calls were billed (budget.max_usd caps it; calls answered from the call "
                           "cache cost nothing). Local models cost GPU time, estimated in GPU-hours with an "
                           "informational GPU $ that no budget counts.",
                   "table": {"columns": ["stage", "est. tokens", "tokens", "est. API $", "API $", "est. GPU-h",
                                         "est. GPU $ (info)"],
                             "rows": [[g["group"], g["est_tokens"], g["actual_tokens"], f"{g['est_usd']:.4f}",
                                       f"{g['actual_usd']:.4f}", f"{g['est_gpu_hours']:.2f}",
                                       f"{g['est_gpu_usd']:.2f}"] for g in rows]}}
        if rows:
            section["image"] = str(out / "cost.png")
        return section

    def _per_accepted(self, by_target) -> dict | None:
        """API dollars per example kept after the filters, per stage (where its builds paid)."""
        from charbuild.recipe.accepted import usd_per_accepted

        per = usd_per_accepted(m for _, m in by_target.values())
        if not per:
            return None
        return {"title": "Cost per accepted example",
                "text": "API $ each stage's builds were charged, over the examples they kept after the quality "
                        "filters (targets answered wholly from the call cache paid nothing and are left out).",
                "table": {"columns": ["stage", "accepted", "API $", "$ per accepted"],
                          "rows": [[st, g["accepted"], f"{g['usd']:.4f}", f"{g['usd_per_accepted']:.6f}"]
                                   for st, g in sorted(per.items())]}}

    def _samples(self, by_target) -> dict:
        per_variant = {}
        for n, (d, _) in by_target.items():
            if n.startswith("eval/samples/"):
                per_variant[n.rsplit("/", 1)[1]] = [s for s in read_jsonl(d / "samples.jsonl") if not s["system"] and s["sample"] == 0]
        prompts = []
        first = next(iter(per_variant.values()), [])
        for i, s in enumerate(first[:6]):
            prompts.append({"prompt": s["prompt"], "responses": {v: rows[i]["text"] for v, rows in per_variant.items() if i < len(rows)}})
        return {"title": "Sample replies (no system prompt)", "samples": prompts}
