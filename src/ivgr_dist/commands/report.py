"""``ivgr-dist report RUN_DIR``: PNG plots and a Markdown page of a run's ``metrics.jsonl``, headless.

Writes ``RUN_DIR/report/`` - one PNG per plot whose keys the file holds, and ``report.md`` linking them
(relative links, so the folder can be copied or viewed on GitHub) with the first- vs last-window means of the
main reward keys, the steps and the final weight version. A plot with no data is not written and the page
says why, so an absent picture is never mistaken for a flat line.

Values are plotted raw: a missing key or a ``null`` (a non-finite value, see ``ivgr_dist.runtime.metrics``) is a gap
(a lone value still shows as a marker); the only smoothing is the accuracy plot's dashed moving average,
labelled as such, next to the raw values. A resumed run logs the steps after its checkpoint again: the last
record of each step is the one plotted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ivgr_dist.runtime.metrics import read_metrics

STREAMS = ("grounded", "textual", "single")  # the known streams, in this order; others follow by name
# One colour per reward component in every stream's subplot, so a single legend serves them all.
COMPONENT_COLORS = {
    "overall": "black",
    "accuracy": "tab:blue",
    "format": "tab:orange",
    "box_valid": "tab:green",
    "box_iou": "tab:red",
    "consistency": "tab:purple",
}
STREAM_COLORS = {"grounded": "tab:red", "textual": "tab:blue", "single": "tab:green"}
SUMMARY_COMPONENTS = ("overall", "accuracy", "box_iou", "consistency")
FIG_SIZE = (8.0, 4.5)
BAR_STEPS = 100  # step-time plots of more steps are a stacked area
DPI = 100
# The step-time components, bottom to top, and their colours.
TIME_PARTS = {
    "generate": "tab:blue",
    "reward tail": "tab:orange",
    "learner": "tab:green",
    "sync": "tab:red",
    "other": "tab:gray",
}


class Table:
    """The records as columns over their steps: one row per step (the last record of a repeated step),
    ``column(key)`` a float array with NaN where the key is absent, ``null`` or not a number."""

    def __init__(self, records: list[dict]):
        by_step: dict[int, dict] = {}
        for i, r in enumerate(records):
            by_step[int(r.get("step", i + 1))] = r  # a later record of the same step replaces the earlier
        self.repeated = len(records) - len(by_step)
        self.steps = np.array(sorted(by_step), dtype=float)
        self.rows = [by_step[s] for s in sorted(by_step)]
        self.keys = {k for r in self.rows for k in r}

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, key: str) -> np.ndarray:
        return np.array([_number(r.get(key)) for r in self.rows], dtype=float)

    def has(self, key: str) -> bool:
        """Whether ``key`` has at least one finite value."""
        return key in self.keys and bool(np.isfinite(self.column(key)).any())

    def reward_keys(self) -> dict[str, list[str]]:
        """``reward/<stream>/<component>`` keys with data, per stream (known streams first)."""
        found: dict[str, list[str]] = {}
        for key in sorted(self.keys):
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "reward" and self.has(key):
                found.setdefault(parts[1], []).append(key)
        order = [s for s in STREAMS if s in found] + sorted(s for s in found if s not in STREAMS)
        return {s: sorted(found[s], key=_component_order) for s in order}


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _component_order(key: str) -> tuple[int, str]:
    name = key.rsplit("/", 1)[1]
    known = list(COMPONENT_COLORS)
    return (known.index(name) if name in known else len(known), name)


def step_time_breakdown(table: Table) -> dict[str, np.ndarray]:
    """Where each step's wall time (``time/step_s``) went, as the parts stacked in ``step_time.png``.

    - ``generate``: the generation the step waited for. A step waits for its batch (``time/wait_s``): in a
      synchronous run that is all of the generation; in an asynchronous one the batch was produced while the
      previous step trained, so only ``min(time/wait_s, time/generate_s)`` is the step's time (what
      ``time/overhead_s`` in the trainer also counts as exposed). Files without ``time/wait_s`` (written
      before it existed, synchronous) use ``time/generate_s``.
    - ``reward tail``: the scoring after the last group was generated (``reward/tail_s``), again only the part
      inside the wait: ``min(reward/tail_s, time/wait_s - generate)``; all of it without ``time/wait_s``.
    - ``learner``: ``time/learner_s`` (input placement, log-prob passes and updates); ``sync``: ``time/sync_s``.
    - ``other``: ``time/step_s`` minus the four, clipped at 0: sampling and prompt building inside the wait,
      the fleet step (``time/fleet_s``), the weight probe check and the driver's own work.

    A missing or ``null`` part counts as 0, so its time lands in ``other`` and the stack still reaches
    ``time/step_s``; steps without a finite ``time/step_s`` have nothing to break down and are left out.
    Returns arrays over the kept steps: ``step``, ``total`` (``time/step_s``), one per part (their sum is
    ``total`` unless ``other`` was clipped) and ``all_generation`` (``time/generate_s``, hidden part included).
    """
    total = table.column("time/step_s")
    keep = np.isfinite(total)

    def part(key: str) -> np.ndarray:
        return np.nan_to_num(table.column(key)[keep], nan=0.0).clip(min=0.0)

    generate, tail, wait = part("time/generate_s"), part("reward/tail_s"), table.column("time/wait_s")[keep]
    has_wait = np.isfinite(wait)
    wait = np.nan_to_num(wait, nan=0.0)
    generate = np.where(has_wait, np.minimum(wait, generate), generate)
    tail = np.where(has_wait, np.minimum(tail, np.maximum(wait - generate, 0.0)), tail)
    parts = {"generate": generate, "reward tail": tail, "learner": part("time/learner_s"), "sync": part("time/sync_s")}
    parts["other"] = np.maximum(total[keep] - sum(parts.values()), 0.0)
    return {
        "step": table.steps[keep],
        "total": total[keep],
        **parts,
        "all_generation": table.column("time/generate_s")[keep],
    }


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` steps' finite values; NaN until a full window has passed."""
    out = np.full(len(values), math.nan)
    for i in range(window - 1, len(values)):
        chunk = values[i - window + 1 : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        if len(chunk):
            out[i] = chunk.mean()
    return out


def window_means(table: Table, key: str, window: int = 5) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """``((first_step, last_step), mean)`` of the first and of the last ``window`` finite values of ``key``;
    the window shrinks to half the values (at least 1) so the two never overlap, as in the train summary."""
    values = table.column(key)
    ok = np.isfinite(values)
    values, steps = values[ok], table.steps[ok]
    if not len(values):
        return None
    w = max(1, min(window, len(values) // 2 or 1))
    first = ((steps[0], steps[w - 1]), float(values[:w].mean()))
    last = ((steps[-w], steps[-1]), float(values[-w:].mean()))
    return first, last


# ----------------------------------------------------------------------------------------------- plots


@dataclass
class Plot:
    """One picture of the report: its file, the keys it draws from and what the page says about it."""

    file: str
    title: str
    keys: list[str]  # the keys it would draw (for the page's "absent" line)
    draw: Callable[[Table, Path], list[str]]  # writes the PNG, returns the keys drawn ([]: nothing to draw)
    used: list[str] = field(default_factory=list)


def _figure(nrows: int = 1, height: float | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIG_SIZE[0], height or FIG_SIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: no display, no pyplot state shared with the caller
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _style(ax, title: str, ylabel: str, xlabel: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)


def _legend(fig, ncol: int = 3, handles: list | None = None) -> None:
    """One legend for the figure, below the axes (constrained layout makes room): never on top of the data,
    never clipped at the edge, and the axes keep the full width. By default the entries of every axes, a label
    already shown by an earlier axes left out (the reward subplots share their colours)."""
    if handles is None:
        handles, seen = [], set()
        for ax in fig.axes:
            entries = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels(), strict=True) if lab not in seen]
            handles += [h for h, _ in entries]
            seen.update(lab for _, lab in entries)
    labels = [h.get_label() for h in handles]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(labels)), fontsize=9, frameon=False)


def _line(ax, table: Table, key: str, label: str, **kwargs):
    """Raw values; NaN is a gap and the markers keep a lone value visible."""
    style = {"marker": "o" if len(table) <= 200 else None, "markersize": 3, "linewidth": 1.3, **kwargs}
    (line,) = ax.plot(table.steps, table.column(key), label=label, **style)
    return line


def _unit_range(ax, values: list[np.ndarray]) -> None:
    """Rewards are mostly in [0, 1]: show at least that, so a flat 0 reads as 0 rather than as noise. When
    every value is the same the lines lie on top of each other; the axes say so."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    lo, hi = min(0.0, float(finite.min())), max(1.0, float(finite.max()))
    pad = 0.05 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    if len(values) > 1 and finite.min() == finite.max():
        ax.text(
            0.5,
            0.5,
            f"every value is {finite[0]:.3g}: the {len(values)} lines overlap",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=9,
            color="dimgray",
        )


def _draw_rewards(table: Table, path: Path) -> list[str]:
    streams = table.reward_keys()
    if not streams:
        return []
    fig, axes = _figure(len(streams), height=max(FIG_SIZE[1], 1.2 + 2.2 * len(streams)))
    used: list[str] = []
    for i, (ax, (stream, keys)) in enumerate(zip(axes, streams.items(), strict=True)):
        for key in keys:
            name = key.rsplit("/", 1)[1]
            _line(ax, table, key, name, color=COMPONENT_COLORS.get(name), linewidth=2.0 if name == "overall" else 1.3)
        used += keys
        _unit_range(ax, [table.column(k) for k in keys])
        _style(ax, f"{stream} stream: reward/{stream}/<component>", "batch mean", xlabel=i == len(streams) - 1)
    fig.suptitle("Reward components per stream (raw per-step values)", fontsize=12)
    _legend(fig, ncol=6)  # one colour per component in every subplot, so one legend for all
    fig.savefig(path)
    return used


def _draw_accuracy_iou(table: Table, path: Path) -> list[str]:
    keys = [f"reward/{s}/accuracy" for s in table.reward_keys()] + ["reward/grounded/box_iou"]
    keys = [k for k in keys if table.has(k)]
    if not keys:
        return []
    fig, (ax,) = _figure()
    window = max(3, min(50, len(table) // 10))
    smooth = len(table) >= 10
    raw, means = [], []
    for key in keys:
        color = "tab:purple" if key == "reward/grounded/box_iou" else STREAM_COLORS.get(key.split("/")[1])
        raw.append(_line(ax, table, key, key + (" (raw)" if smooth else ""), color=color, alpha=0.6 if smooth else 1))
        if smooth:
            avg = moving_average(table.column(key), window)
            label = f"moving mean, last {window} steps"
            means += ax.plot(table.steps, avg, "--", color=color, linewidth=2.0, label=label)
    _unit_range(ax, [table.column(k) for k in keys])
    _style(ax, "Accuracy per stream and grounded box IoU", "batch mean")
    _legend(fig, ncol=2, handles=raw + means)  # column-major: with means, each series has its mean beside it
    fig.savefig(path)
    return keys


def _draw_step_time(table: Table, path: Path) -> list[str]:
    """Stacked bars per step; past ``BAR_STEPS`` steps bars turn into slivers, so a stacked area instead."""
    if not table.has("time/step_s"):
        return []
    parts = step_time_breakdown(table)
    steps = parts["step"]
    fig, (ax,) = _figure()
    waited = table.has("time/wait_s")
    labels = {
        "generate": "generate (waited for)" if waited else "generate",
        "reward tail": "reward tail",
        "learner": "learner",
        "sync": "weight sync",
        "other": "other",
    }
    bars = len(steps) <= BAR_STEPS
    if bars:
        width = 0.8 * (float(np.diff(steps).min()) if len(steps) > 1 else 1.0)
        bottom, handles = np.zeros(len(steps)), []
        for name, color in TIME_PARTS.items():
            handles.append(ax.bar(steps, parts[name], width, bottom=bottom, color=color, label=labels[name], lw=0))
            bottom = bottom + parts[name]
        handles += ax.plot(steps, parts["total"], ls="none", marker="_", ms=12, color="black", label="time/step_s")
        ax.set_xlim(steps[0] - width, steps[-1] + width)
    else:
        handles = ax.stackplot(
            steps,
            *(parts[n] for n in TIME_PARTS),
            labels=[labels[n] for n in TIME_PARTS],
            colors=list(TIME_PARTS.values()),
        )
        handles += ax.plot(steps, parts["total"], color="black", lw=0.6, label="time/step_s")
        ax.set_xlim(steps[0], steps[-1])
    # Generation that overlapped the previous step is not in the stack; show it so it is not lost.
    hidden = parts["all_generation"] - parts["generate"] > 0.05 * parts["total"]
    if waited and bool(hidden.any()):
        handles += ax.plot(
            steps,
            parts["all_generation"],
            ls=":",
            marker="x" if bars else None,
            ms=5,
            color="tab:blue",
            label="time/generate_s (all generation, incl. overlapped)",
        )
    _style(ax, "Step time by phase (stacked)", "seconds")
    ax.set_ylim(bottom=0)
    _legend(fig, ncol=3, handles=handles)
    fig.savefig(path)
    used = ["time/step_s", "time/generate_s", "time/wait_s", "reward/tail_s", "time/learner_s", "time/sync_s"]
    return [k for k in used if table.has(k)]


def _draw_throughput(table: Table, path: Path) -> list[str]:
    rollout = table.has("rollout/tokens_per_s")
    learner = table.has("learner/tokens") and table.has("time/learner_s")
    if not (rollout or learner):
        return []
    fig, (ax,) = _figure()
    used = []
    if rollout:
        _line(ax, table, "rollout/tokens_per_s", "generation: rollout/tokens_per_s", color="tab:blue")
        used.append("rollout/tokens_per_s")
    if learner:
        seconds = table.column("time/learner_s")
        rate = table.column("learner/tokens") / np.where(seconds > 0, seconds, np.nan)
        style = {"marker": "o" if len(table) <= 200 else None, "markersize": 3, "linewidth": 1.3}
        ax.plot(table.steps, rate, color="tab:green", label="learner: learner/tokens / time/learner_s", **style)
        used += ["learner/tokens", "time/learner_s"]
    _style(ax, "Throughput", "tokens / s")
    ax.set_ylim(bottom=0)
    _legend(fig)
    fig.savefig(path)
    return used


def _draw_logprob(table: Table, path: Path) -> list[str]:
    keys = [k for k in ("logprob/mismatch_mean", "logprob/offpolicy_abs_mean") if table.has(k)]
    if not keys:
        return []
    from matplotlib.ticker import FuncFormatter

    fig, (ax,) = _figure()
    labels = {
        "logprob/mismatch_mean": "logprob/mismatch_mean (tokens sampled by the current policy)",
        "logprob/offpolicy_abs_mean": "logprob/offpolicy_abs_mean (tokens of older versions)",
    }
    for key, color in zip(keys, ("tab:blue", "tab:orange"), strict=False):
        _line(ax, table, key, labels[key], color=color)
    values = np.concatenate([table.column(k) for k in keys])
    values = values[np.isfinite(values)]
    log_scale = bool((values > 0).all())
    if log_scale:
        ax.set_yscale("log")
        if values.max() / values.min() < 10:  # within a decade: plain tick labels instead of 9.5x10^-4
            plain = FuncFormatter(lambda v, _: f"{v:.3g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    ylabel = "mean |learner - engine| log-prob" + (" (log scale)" if log_scale else "")
    _style(ax, "Learner vs engine log-prob difference per token", ylabel)
    _legend(fig, ncol=1)
    fig.savefig(path)
    return keys


def _draw_staleness(table: Table, path: Path) -> list[str]:
    keys = [k for k in ("rollout/staleness_mean", "rollout/staleness_max") if table.has(k)]
    if not keys:
        return []
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = _figure()
    styles = {
        "rollout/staleness_mean": {"color": "tab:blue", "linewidth": 2.5},
        "rollout/staleness_max": {"color": "tab:orange", "linestyle": "--", "marker": "x", "markersize": 6},
    }
    for key in keys:
        _line(ax, table, key, key, **styles[key])
    _style(ax, "Rollout staleness: learner version minus the version that generated", "weight versions")
    ax.set_ylim(bottom=-0.1, top=max(1.0, float(np.nanmax([table.column(k) for k in keys]))) + 0.2)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig)
    fig.savefig(path)
    return keys


def _draw_fleet(table: Table, path: Path) -> list[str]:
    keys = [k for k in ("rollout/engines_live", "rollout/engines_target", "rollout/engines_pending") if table.has(k)]
    if not any(k in keys for k in ("rollout/engines_live", "rollout/engines_target")):
        return []
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = _figure()
    styles = {
        "rollout/engines_live": {"color": "tab:green", "linewidth": 2.5},
        "rollout/engines_target": {"color": "black", "linestyle": "--"},
        "rollout/engines_pending": {"color": "tab:orange", "linestyle": ":"},
    }
    for key in keys:
        _line(ax, table, key, key, drawstyle="steps-mid", **styles[key])
    _style(ax, "Rollout engine fleet at the end of each step", "engines")
    ax.set_ylim(bottom=-0.2, top=float(np.nanmax([table.column(k) for k in keys])) + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig)
    fig.savefig(path)
    return keys


def _plots() -> list[Plot]:
    return [
        Plot("rewards.png", "Reward components", ["reward/<stream>/<component>"], _draw_rewards),
        Plot(
            "accuracy_iou.png",
            "Accuracy and box IoU",
            ["reward/<stream>/accuracy", "reward/grounded/box_iou"],
            _draw_accuracy_iou,
        ),
        Plot("step_time.png", "Step time", ["time/step_s"], _draw_step_time),
        Plot(
            "throughput.png",
            "Throughput",
            ["rollout/tokens_per_s", "learner/tokens + time/learner_s"],
            _draw_throughput,
        ),
        Plot(
            "logprob_mismatch.png",
            "Log-prob mismatch",
            ["logprob/mismatch_mean", "logprob/offpolicy_abs_mean"],
            _draw_logprob,
        ),
        Plot("staleness.png", "Staleness", ["rollout/staleness_mean", "rollout/staleness_max"], _draw_staleness),
        Plot("fleet.png", "Engine fleet", ["rollout/engines_live", "rollout/engines_target"], _draw_fleet),
    ]


# ----------------------------------------------------------------------------------------------- report


def write_report(run_dir: str | Path, window: int = 5) -> Path:
    """Write ``RUN_DIR/report/`` (the PNGs with data and ``report.md``) and return the ``report.md`` path.

    Raises ``FileNotFoundError`` naming ``RUN_DIR/metrics.jsonl`` when it is not there. PNGs of this
    report's names left by an earlier report and not written now are removed, so the folder holds exactly
    what ``report.md`` links."""
    run_dir = Path(run_dir)
    source = run_dir / "metrics.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"no metrics file {source}")
    table = Table(read_metrics(source))
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots()
    for plot in plots:
        path = out / plot.file
        path.unlink(missing_ok=True)
        if len(table):
            plot.used = plot.draw(table, path)
    page = out / "report.md"
    page.write_text(_markdown(run_dir, table, plots, window))
    return page


def _markdown(run_dir: Path, table: Table, plots: list[Plot], window: int) -> str:
    lines = [f"# Run report: {run_dir.resolve().name}", ""]
    if not len(table):
        lines += ["`metrics.jsonl` holds no records: nothing to plot.", ""]
    else:
        lines += _summary(table, window)
    lines += ["## Plots", ""]
    for plot in plots:
        lines.append(f"### {plot.title}")
        lines.append("")
        if plot.used:
            lines += [f"![{plot.title}]({plot.file})", "", "Keys: " + ", ".join(f"`{k}`" for k in plot.used), ""]
            if plot.file == "step_time.png":
                lines += [_step_time_note(table), ""]
        else:
            keys = ", ".join(f"`{k}`" for k in plot.keys)
            lines += [f"Not plotted: no values of {keys} in `metrics.jsonl`.", ""]
    return "\n".join(lines)


def _summary(table: Table, window: int) -> list[str]:
    steps = table.steps
    lines = [
        f"Source: `metrics.jsonl`, {len(table)} steps ({steps[0]:.0f}-{steps[-1]:.0f}).",
    ]
    if table.repeated:
        lines[-1] += f" {table.repeated} records repeat an earlier step (a resume): the last record of each is used."
    version = table.column("weight_version")
    finite = version[np.isfinite(version)]
    lines[-1] += f" Final weight version: {finite[-1]:.0f}." if len(finite) else " Final weight version: not logged."
    rows = []
    for stream, keys in table.reward_keys().items():
        for name in SUMMARY_COMPONENTS:
            key = f"reward/{stream}/{name}"
            means = window_means(table, key, window) if key in keys else None
            if means is not None:
                (s0, m0), (s1, m1) = means
                rows.append(
                    f"| `{key}` | {m0:.3f} (steps {s0[0]:.0f}-{s0[1]:.0f}) | {m1:.3f} (steps {s1[0]:.0f}-{s1[1]:.0f})"
                    f" | {m1 - m0:+.3f} |"
                )
    lines.append("")
    if rows:
        lines += [
            f"Mean of the first vs the last {window} steps with a value (fewer when a key has under {2 * window}):",
            "",
            "| key | first window | last window | change |",
            "|---|---|---|---|",
            *rows,
        ]
    else:
        lines.append("No reward keys in `metrics.jsonl`.")
    return [*lines, ""]


def _step_time_note(table: Table) -> str:
    parts = step_time_breakdown(table)
    total = parts["total"].sum()
    shares = ", ".join(f"{name} {parts[name].sum() / total:.0%}" for name in TIME_PARTS) if total > 0 else "n/a"
    source = (
        "the part of `time/generate_s` and `reward/tail_s` inside `time/wait_s`"
        if table.has("time/wait_s")
        else "`time/generate_s` and `reward/tail_s`"
    )
    return (
        f"Generation and reward tail are {source} (in an asynchronous run the rest overlapped the previous step); "
        f"other = `time/step_s` minus the parts. Share of all step time: {shares}."
    )
