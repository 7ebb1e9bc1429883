"""Evaluation report: matplotlib plots (PNG) and a self-contained HTML page.

Plots use `matplotlib.figure.Figure` directly (Agg canvas, no pyplot global state), so
they are safe to draw from worker threads and never need a display.

`render_html` is a deliberately generic renderer: the evaluation stage assembles
sections (markers, Elo, preferences, ablation, gates, loss curves, cost, samples) and
this module only lays them out. The shape of `report` is documented on `render_html`.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# Colour-blind-safe pair (Okabe-Ito) used throughout: "with"/"estimated" vs "without"/"actual".
BLUE, ORANGE, GREEN, GREY = "#0072B2", "#E69F00", "#009E73", "#7f7f7f"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- plots

def _fig(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _save(fig: Figure, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def plot_elo(ratings: Mapping[str, Mapping | float], path, title: str = "Elo ratings (mean ± std)") -> None:
    """Horizontal error bars, one row per model, best at the top.

    `ratings` is `evalstats.bootstrap_ratings` output ({model: {"mean", "std", ...}});
    plain floats are accepted and drawn without error bars."""
    items = []
    for name, r in ratings.items():
        if isinstance(r, Mapping):
            mean = _num(r.get("mean", r.get("mle")))
            std = _num(r.get("std")) or 0.0
        else:
            mean, std = _num(r), 0.0
        if mean is not None:
            items.append((str(name), mean, std))
    items.sort(key=lambda t: t[1])
    fig, axes = _fig(7.5, max(2.2, 0.45 * len(items) + 1.2))
    ax = axes[0, 0]
    if items:
        y = np.arange(len(items))
        means = [t[1] for t in items]
        stds = [t[2] for t in items]
        ax.errorbar(means, y, xerr=stds, fmt="o", color=BLUE, ecolor=BLUE, elinewidth=2, capsize=4, markersize=6)
        ax.set_yticks(y, [t[0] for t in items])
        ax.axvline(1000, color=GREY, linestyle="--", linewidth=1)
        span = max((m + s for _, m, s in items)) - min((m - s for _, m, s in items))
        pad = max(span * 0.02, 1.0)
        for yi, (_, m, s) in zip(y, items):
            ax.annotate(f"{m:.0f} ± {s:.0f}" if s else f"{m:.0f}", (m + s + pad, yi), va="center", fontsize=8)
        lo = min(m - s for _, m, s in items)
        hi = max(m + s for _, m, s in items)
        ax.set_xlim(lo - 0.08 * max(span, 20), hi + 0.25 * max(span, 20))
        ax.set_ylim(-0.6, len(items) - 0.4)
    else:
        ax.text(0.5, 0.5, "no ratings", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("rating (Elo scale; 1000 = mean)")
    ax.set_title(title)
    _save(fig, path)


def _condition(row: Mapping) -> str:
    return "with system prompt" if row.get("system_prompt") else "without system prompt"


def plot_marker_rates(rows: list[dict], path, title: str = "Character-marker rate") -> None:
    """Grouped bars (with / without system prompt) per model with Wilson-interval
    error bars; when rows carry two or more distinct `scale` values, a second panel
    plots rate against data scale, one line per `series` (default: the condition).

    Row keys: "model", "system_prompt" (bool), "rate", "ci_low", "ci_high", "scale"
    (float or None), optional "series". Rows whose rate is None are skipped."""
    rows = [r for r in rows if _num(r.get("rate")) is not None]
    scales = sorted({float(r["scale"]) for r in rows if _num(r.get("scale")) is not None})
    with_line = len(scales) >= 2

    # Bars: one group per model; a model that appears at several scales gets one group per scale.
    model_scales: dict[str, set] = {}
    for r in rows:
        model_scales.setdefault(str(r.get("model")), set()).add(r.get("scale"))
    groups: list[str] = []
    labelled: list[tuple[str, Mapping]] = []
    for r in rows:
        m = str(r.get("model"))
        label = f"{m} ({r.get('scale')})" if len(model_scales[m]) > 1 else m
        if label not in groups:
            groups.append(label)
        labelled.append((label, r))
    conditions = [c for c in ("with system prompt", "without system prompt") if any(_condition(r) == c for r in rows)]
    colours = {"with system prompt": BLUE, "without system prompt": ORANGE}

    ncols = 2 if with_line else 1
    fig, axes = _fig(max(6.5, 1.1 * len(groups) + 3) + (5 if with_line else 0), 4.2, 1, ncols)
    ax = axes[0, 0]
    width = 0.8 / max(len(conditions), 1)
    x = np.arange(len(groups))
    for ci, cond in enumerate(conditions):
        vals, err_lo, err_hi, xs = [], [], [], []
        for gi, g in enumerate(groups):
            match = [r for lab, r in labelled if lab == g and _condition(r) == cond]
            if not match:
                continue
            r = match[0]
            rate = float(r["rate"])
            lo = _num(r.get("ci_low"))
            hi = _num(r.get("ci_high"))
            xs.append(gi + (ci - (len(conditions) - 1) / 2) * width)
            vals.append(rate)
            err_lo.append(max(rate - lo, 0.0) if lo is not None else 0.0)
            err_hi.append(max(hi - rate, 0.0) if hi is not None else 0.0)
        ax.bar(xs, vals, width * 0.92, color=colours[cond], label=cond, yerr=[err_lo, err_hi],
               capsize=3, error_kw={"elinewidth": 1, "ecolor": "#333333"})
    ax.set_xticks(x, groups, rotation=20 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of responses with a marker")
    ax.set_title(title)
    if conditions:   # outside the axes: bars near 1.0 are the common case and a legend would cover them
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=len(conditions),
                   frameon=False, fontsize=9)
    if not rows:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)

    if with_line:
        ax2 = axes[0, 1]
        series: dict[str, list] = {}
        for r in rows:
            if _num(r.get("scale")) is None:
                continue
            series.setdefault(str(r.get("series") or _condition(r)), []).append(r)
        palette = [BLUE, ORANGE, GREEN, "#CC79A7", "#D55E00", "#56B4E9", GREY]
        for i, (name, rs) in enumerate(series.items()):
            rs = sorted(rs, key=lambda r: float(r["scale"]))
            sx = [float(r["scale"]) for r in rs]
            sy = [float(r["rate"]) for r in rs]
            lo = [max(y - (_num(r.get("ci_low")) if _num(r.get("ci_low")) is not None else y), 0) for y, r in zip(sy, rs)]
            hi = [max((_num(r.get("ci_high")) if _num(r.get("ci_high")) is not None else y) - y, 0) for y, r in zip(sy, rs)]
            colour = colours.get(name, palette[i % len(palette)])
            ax2.errorbar(sx, sy, yerr=[lo, hi], fmt="-o", color=colour, capsize=3, label=name)
        if scales[0] > 0 and scales[-1] / scales[0] >= 20:
            ax2.set_xscale("log")
        ax2.set_xticks(scales, [f"{s:g}" for s in scales])
        ax2.set_ylim(0, 1.05)
        ax2.set_xlabel("data scale")
        ax2.set_ylabel("marker rate")
        ax2.set_title("Marker rate vs data scale")
        if any(name not in colours for name in series):
            ax2.legend(frameon=False, fontsize=8, loc="best")
    _save(fig, path)


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")


def plot_loss(metrics_rows: list[dict], path, title: str) -> None:
    """Training loss per step, and (when logged) DPO reward accuracy and margin.

    Rows are TRL log entries: {"step", "loss", "rewards/accuracies", "rewards/margins",
    ...}; rows without a numeric "loss" (eval or summary rows) are ignored except for
    "eval_loss", which is drawn as points. A missing "step" falls back to the row index.
    Long noisy curves also get a moving average."""
    train = [(r.get("step", i), _num(r.get("loss")), _num(r.get("rewards/accuracies")), _num(r.get("rewards/margins")))
             for i, r in enumerate(metrics_rows) if "loss" in r]
    evals = [(r.get("step", i), _num(r.get("eval_loss"))) for i, r in enumerate(metrics_rows)
             if _num(r.get("eval_loss")) is not None]
    has_acc = any(t[2] is not None for t in train)
    has_margin = any(t[3] is not None for t in train)
    nrows = 2 if (has_acc or has_margin) else 1
    fig, axes = _fig(7.5, 3.0 * nrows + 0.6, nrows, 1, sharex=True)
    ax = axes[0, 0]
    steps = np.array([float(t[0]) for t in train])
    loss = np.array([t[1] if t[1] is not None else np.nan for t in train], dtype=float)
    if len(train):
        ax.plot(steps, loss, color=BLUE, alpha=0.45 if len(train) > 30 else 1.0, linewidth=1,
                marker="o" if len(train) <= 30 else None, markersize=3, label="loss")
        if len(train) > 30 and np.isfinite(loss).all():
            w = max(5, len(train) // 20)
            ax.plot(steps[w - 1:], _moving_average(loss, w), color=BLUE, linewidth=2, label=f"loss ({w}-step mean)")
    if evals:
        ax.plot([float(e[0]) for e in evals], [e[1] for e in evals], "s", color=ORANGE, label="eval loss")
    if not len(train) and not evals:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("loss")
    ax.set_title(title)
    if len(train) or evals:
        ax.legend(frameon=False, fontsize=8)
    if nrows == 2:
        ax_b = axes[1, 0]
        handles = []
        if has_acc:
            acc = [t[2] if t[2] is not None else np.nan for t in train]
            handles += ax_b.plot(steps, acc, color=GREEN, linewidth=1.5, label="reward accuracy")
            ax_b.set_ylim(-0.02, 1.02)
            ax_b.set_ylabel("reward accuracy")
        if has_margin:
            ax_m = ax_b.twinx() if has_acc else ax_b
            marg = [t[3] if t[3] is not None else np.nan for t in train]
            handles += ax_m.plot(steps, marg, color=ORANGE, linewidth=1.5, label="reward margin")
            ax_m.set_ylabel("reward margin")
            if ax_m is not ax_b:
                ax_m.spines["right"].set_visible(True)
                ax_m.spines["top"].set_visible(False)
        ax_b.legend(handles=handles, frameon=False, fontsize=8, loc="lower right")
        ax_b.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    _save(fig, path)


def plot_cost(rows: list[dict], path, title: str = "Cost: estimated vs actual") -> None:
    """Estimated vs actual spend per target group: USD on the left, tokens on the right.

    Row keys: "group", "est_usd", "actual_usd", "est_tokens", "actual_tokens"; an actual
    of None (not built yet) draws no bar."""
    groups = [str(r.get("group")) for r in rows]
    fig, axes = _fig(10, max(2.4, 0.5 * len(groups) + 1.3), 1, 2)
    y = np.arange(len(groups))
    h = 0.38
    for ax, key, label in ((axes[0, 0], "usd", "USD"), (axes[0, 1], "tokens", "tokens")):
        est = [_num(r.get(f"est_{key}")) for r in rows]
        act = [_num(r.get(f"actual_{key}")) for r in rows]
        ax.barh(y - h / 2, [v or 0 for v in est], h, color=BLUE, label="estimated")
        ax.barh([yi + h / 2 for yi, v in zip(y, act) if v is not None], [v for v in act if v is not None], h,
                color=ORANGE, label="actual")
        for yi, v in zip(y, act):
            if v is None:
                ax.annotate("not built", (0, yi + h / 2), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=7, color=GREY)
        ax.set_yticks(y, groups)
        ax.set_ylim(max(len(groups), 1) - 0.5, -0.5)      # first group on top
        ax.set_xlabel(label)
        if key == "tokens":
            ax.xaxis.set_major_formatter(_si_formatter())
            ax.tick_params(labelleft=False)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no cost data", ha="center", va="center", transform=axes[0, 0].transAxes)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=2, frameon=False, fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


def _si_formatter():
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _pos):
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:g}{suffix}"
        return f"{v:g}"
    return FuncFormatter(fmt)


# --------------------------------------------------------------------------- HTML

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --zebra:#f6f8fa; --accent:#0969da; --card:#ffffff; }
* { box-sizing: border-box; }
body { margin:0; background:#f3f4f6; color:var(--fg);
  font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1100px; margin:0 auto; padding:28px 28px 60px; background:var(--card); min-height:100vh;
  box-shadow:0 0 0 1px var(--line); }
header h1 { font-size:1.75rem; margin:0 0 4px; line-height:1.25; }
header .meta { color:var(--muted); font-size:.9rem; margin:0 0 18px; }
header .meta code { font-size:.85rem; }
.summary { display:grid; grid-template-columns:repeat(auto-fill,minmax(170px,1fr)); gap:10px;
  margin:0 0 18px; padding:0; }
.summary div { border:1px solid var(--line); border-radius:8px; padding:10px 12px; background:var(--zebra); }
.summary dt { font-size:.75rem; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.summary dd { margin:2px 0 0; font-size:1.15rem; font-weight:600; overflow-wrap:anywhere; }
nav.toc { font-size:.9rem; border-top:1px solid var(--line); border-bottom:1px solid var(--line);
  padding:8px 0; margin-bottom:8px; }
nav.toc a { color:var(--accent); text-decoration:none; margin-right:14px; white-space:nowrap; }
nav.toc a:hover { text-decoration:underline; }
section { margin-top:30px; }
h2 { font-size:1.3rem; margin:0 0 10px; padding-bottom:4px; border-bottom:1px solid var(--line); }
p { margin:0 0 10px; }
.table-wrap { overflow-x:auto; margin:8px 0 4px; }
table { border-collapse:collapse; font-size:.9rem; min-width:50%; }
th, td { padding:6px 12px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#eaeef2; font-weight:600; position:sticky; top:0; }
tbody tr:nth-child(even) { background:var(--zebra); }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.badge { display:inline-block; padding:0 8px; border-radius:10px; font-size:.8rem; font-weight:600; }
.badge.pass { background:#dafbe1; color:#116329; }
.badge.fail { background:#ffebe9; color:#a40e26; }
.badge.warn { background:#fff8c5; color:#7d4e00; }
.csv { font-size:.8rem; color:var(--muted); }
.csv a { color:var(--accent); }
figure { margin:12px 0; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
figure.missing { color:var(--muted); font-style:italic; }
.sample { border:1px solid var(--line); border-radius:8px; margin:14px 0; overflow:hidden; }
.sample .prompt { background:#eef4fb; padding:8px 12px; border-bottom:1px solid var(--line); white-space:pre-wrap;
  overflow-wrap:anywhere; }
.sample .prompt b { color:var(--muted); font-size:.75rem; text-transform:uppercase; letter-spacing:.04em;
  margin-right:6px; }
.responses { display:grid; grid-template-columns:repeat(auto-fit,minmax(260px,1fr)); }
.response { padding:8px 12px; border-right:1px solid var(--line); min-width:0; }
.response:last-child { border-right:none; }
.response h3 { font-size:.8rem; margin:0 0 4px; color:var(--accent); font-weight:600; }
.response div { white-space:pre-wrap; overflow-wrap:anywhere; font-size:.88rem; max-height:26em; overflow-y:auto; }
footer { margin-top:40px; font-size:.8rem; color:var(--muted); }
"""

_BADGES = {"pass": "pass", "passed": "pass", "ok": "pass", "fail": "fail", "failed": "fail",
           "warn": "warn", "warning": "warn", "skipped": "warn"}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "section"


def _fmt(v) -> tuple[str, bool]:
    """Display text for a table cell, and whether it is numeric."""
    if v is None:
        return "—", False
    if isinstance(v, bool):
        return ("yes" if v else "no"), False
    if isinstance(v, int):
        return f"{v:,}", True
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—", True
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}", True
        return (f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"), True
    return str(v), False


def _cell(v, tag: str = "td") -> str:
    text, numeric = _fmt(v)
    esc = html.escape(text)
    badge = _BADGES.get(text.strip().lower()) if isinstance(v, str) else None
    if badge:
        esc = f'<span class="badge {badge}">{esc}</span>'
    cls = ' class="num"' if numeric else ""
    return f"<{tag}{cls}>{esc}</{tag}>"


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in re.split(r"\n\s*\n", str(text)) if p.strip()]
    return "\n".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in parts)


def _image_html(path, out_dir: Path, embed: bool, alt: str) -> str:
    p = Path(path)
    if not p.is_file():
        return f'<figure class="missing">image not found: {html.escape(str(path))}</figure>'
    if embed:
        mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml",
                "gif": "image/gif"}.get(p.suffix.lower().lstrip("."), "application/octet-stream")
        src = f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")
    else:
        try:
            src = p.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            (out_dir / "images").mkdir(exist_ok=True)
            dest = out_dir / "images" / p.name
            shutil.copyfile(p, dest)
            src = f"images/{p.name}"
    return f'<figure><img src="{html.escape(src, quote=True)}" alt="{html.escape(alt, quote=True)}"></figure>'


def _write_csv(path: Path, columns: list, rows: list) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (str, Path)):
        return [v]
    return list(v) if isinstance(v, Iterable) else [v]


def render_html(report: dict, out_dir, embed_images: bool = True) -> Path:
    """Write `out_dir/report.html`, `out_dir/report.json` and one CSV per table.

    `report`::

        {
          "title": str,                      # page heading
          "spec": str,                       # spec name or path (shown in the header)
          "run": str,                        # run / build name
          "generated": str,                  # timestamp; defaults to now (UTC, ISO 8601)
          "summary": {label: value, ...},    # optional: the header's summary box; by
                                             # default spec, run and number of sections
          "sections": [
            {
              "title": str,
              "text": str,                   # optional; blank lines separate paragraphs
              "table": {"columns": [...], "rows": [[...], ...]},   # optional
              "image": path | [paths],       # optional; PNG written by the plot_* helpers
              "samples": [                   # optional; side-by-side responses
                {"prompt": str, "responses": {model: text, ...}}, ...
              ],
            }, ...
          ],
        }

    Every string is HTML-escaped. Images are embedded as base64 data URIs so the page
    stands alone (`embed_images=False` references them relatively instead, copying any
    that live outside `out_dir` into `out_dir/images/`). Table CSVs are named
    `table-NN-<section-slug>.csv` and linked under their table. Returns the HTML path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = str(report.get("title") or "charbuild evaluation report")
    generated = str(report.get("generated") or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    sections = list(report.get("sections") or [])
    summary = report.get("summary")
    if not summary:
        summary = {"spec": report.get("spec"), "run": report.get("run"), "sections": len(sections)}

    meta = []
    if report.get("run"):
        meta.append(f"run <code>{html.escape(str(report['run']))}</code>")
    if report.get("spec"):
        meta.append(f"spec <code>{html.escape(str(report['spec']))}</code>")
    meta.append(f"generated {html.escape(generated)}")

    body: list[str] = []
    toc: list[str] = []
    csv_files: list[str] = []
    used_ids: set[str] = set()
    for i, sec in enumerate(sections, 1):
        stitle = str(sec.get("title") or f"Section {i}")
        sid = _slug(stitle)
        while sid in used_ids:
            sid += f"-{i}"
        used_ids.add(sid)
        toc.append(f'<a href="#{sid}">{html.escape(stitle)}</a>')
        parts = [f'<section id="{sid}">', f"<h2>{html.escape(stitle)}</h2>"]
        if sec.get("text"):
            parts.append(_paragraphs(sec["text"]))
        table = sec.get("table")
        if table:
            columns = list(table.get("columns") or [])
            rows = [list(r) for r in (table.get("rows") or [])]
            csv_name = f"table-{i:02d}-{sid}.csv"
            _write_csv(out_dir / csv_name, columns, rows)
            csv_files.append(csv_name)
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            trs = "\n".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
            parts.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>\n'
                         f"<tbody>\n{trs}\n</tbody></table></div>")
            parts.append(f'<div class="csv"><a href="{html.escape(csv_name, quote=True)}">{html.escape(csv_name)}</a>'
                         f" · {len(rows)} row{'s' if len(rows) != 1 else ''}</div>")
        for img in _as_list(sec.get("image")):
            parts.append(_image_html(img, out_dir, embed_images, stitle))
        for s in sec.get("samples") or []:
            responses = s.get("responses") or {}
            cards = "".join(f'<div class="response"><h3>{html.escape(str(m))}</h3>'
                            f"<div>{html.escape(str(t) if t is not None else '—')}</div></div>"
                            for m, t in responses.items())
            parts.append(f'<div class="sample"><div class="prompt"><b>Prompt</b>{html.escape(str(s.get("prompt", "")))}'
                         f'</div><div class="responses">{cards}</div></div>')
        parts.append("</section>")
        body.append("\n".join(parts))

    summary_html = "".join(f"<div><dt>{html.escape(str(k))}</dt><dd>{_fmt_summary(v)}</dd></div>"
                           for k, v in summary.items())
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
<h1>{html.escape(title)}</h1>
<p class="meta">{" · ".join(meta)}</p>
<dl class="summary">{summary_html}</dl>
</header>
<nav class="toc">{"".join(toc)}</nav>
{chr(10).join(body)}
<footer>Generated by charbuild · tables as CSV alongside this file · data in report.json</footer>
</main>
</body>
</html>
"""
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    data = dict(report, generated=generated, csv=csv_files)
    (out_dir / "report.json").write_text(json.dumps(_jsonable(data), indent=2, ensure_ascii=False), encoding="utf-8")
    return html_path


def _fmt_summary(v) -> str:
    text, _ = _fmt(v)
    return html.escape(text)
