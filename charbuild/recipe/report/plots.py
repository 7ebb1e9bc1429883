"""Evaluation plots as PNG files: Elo ratings, revealed-preference trait ratings,
character-marker rates, training loss, and cost estimated vs actual (the `plot_*` functions).

Plots use `matplotlib.figure.Figure` directly (Agg canvas, no pyplot global state), so
they are safe to draw from worker threads and never need a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# Colour-blind-safe pair (Okabe-Ito) used throughout: "with"/"estimated" vs "without"/"actual".
BLUE, ORANGE, GREEN, GREY = "#0072B2", "#E69F00", "#009E73", "#7f7f7f"


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

    `ratings` is `eval_stats.bootstrap_ratings` output ({model: {"mean", "std", ...}});
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


def plot_preferences(intervals: Mapping[str, Mapping], online: Mapping[str, float], path, persona: str = "",
                     top: int = 15, title: str = "Revealed preferences") -> None:
    """The `top` traits by Bradley-Terry (and the persona's, wherever it ranks), best at the
    top: the fit with its 95% bootstrap interval, and OCT's online Elo of the same
    judgements beside it. `intervals` is `eval_stats.bootstrap_ratings` output, `online`
    {trait: rating} (`eval_stats.preference_elo_online`)."""
    ranked = sorted(intervals, key=lambda t: -(_num(intervals[t].get("mle")) or 0.0))
    shown = ranked[:top] + ([persona] if persona in ranked[top:] else [])
    shown.reverse()
    fig, axes = _fig(7.5, max(2.2, 0.32 * len(shown) + 1.4))
    ax = axes[0, 0]
    if shown:
        y = np.arange(len(shown))
        mle = np.array([_num(intervals[t].get("mle")) or 0.0 for t in shown])
        lo = np.array([_num(intervals[t].get("ci_low")) for t in shown], dtype=float)
        hi = np.array([_num(intervals[t].get("ci_high")) for t in shown], dtype=float)
        err = np.vstack([np.nan_to_num(np.maximum(mle - lo, 0)), np.nan_to_num(np.maximum(hi - mle, 0))])
        ax.errorbar(mle, y, xerr=err, fmt="o", color=BLUE, ecolor=BLUE, elinewidth=1.5, capsize=3, markersize=5,
                    label="Bradley-Terry (95% bootstrap interval)")
        elo = [(yi, _num(online.get(t))) for yi, t in zip(y, shown)]
        ax.plot([e for _, e in elo if e is not None], [yi for yi, e in elo if e is not None], "D", color=ORANGE,
                markersize=5, label="online Elo (OCT)")
        ax.set_yticks(y, [f"{t} *" if t == persona else t for t in shown])
        ax.axvline(1000, color=GREY, linestyle="--", linewidth=1)
        ax.set_ylim(-0.6, len(shown) - 0.4)
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no ratings", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("rating (Elo scale)" + ("; * the persona's trait" if persona in shown else ""))
    ax.set_title(title)
    _save(fig, path)


def _condition(row: Mapping) -> str:
    return "with system prompt" if row.get("system_prompt") else "without system prompt"


def _error_bar(rate: float, row: Mapping) -> tuple[float, float]:
    """Distances from `rate` down to the row's "ci_low" and up to its "ci_high"; a missing
    bound draws no whisker rather than failing the whole plot."""
    lo, hi = _num(row.get("ci_low")), _num(row.get("ci_high"))
    return (max(rate - lo, 0.0) if lo is not None else 0.0,
            max(hi - rate, 0.0) if hi is not None else 0.0)


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
            rate = float(match[0]["rate"])
            below, above = _error_bar(rate, match[0])
            xs.append(gi + (ci - (len(conditions) - 1) / 2) * width)
            vals.append(rate)
            err_lo.append(below)
            err_hi.append(above)
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
            errs = [_error_bar(y, r) for y, r in zip(sy, rs)]
            colour = colours.get(name, palette[i % len(palette)])
            ax2.errorbar(sx, sy, yerr=[[e[0] for e in errs], [e[1] for e in errs]], fmt="-o", color=colour,
                         capsize=3, label=name)
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
