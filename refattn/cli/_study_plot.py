"""``refattn bench --plot DIR``: one PNG per study, from its :class:`~refattn.bench.StudyResult`.

A study's table becomes

* lines against ``L`` (log-log), one panel per unit (ms, MiB, ...), when the table
  has an ``L`` column with several lengths (scaling studies); else
* grouped horizontal bars, one panel per unit, one bar group per row;

next to a panel of its headline metrics (ratios, speed-ups, exponents) with the
line a target is judged against (1 for ratios and exponents).  The caption
lists the targets not met and the study's notes.  Units come from the column
headers and cells: ``... ms`` is time, ``... MiB`` memory, ``GFLOP/s``
throughput, cells ending in ``%`` a percentage, any other number a ratio.  In a
time column only numbers printed with decimals count: a bare integer there is a
count from a cost model (``refattn bench quaternion-cores``), not a time.
"""

from __future__ import annotations

import re
import textwrap

import numpy as np

__all__ = ["plot_study", "numeric", "unit_of", "plain_log_ticks"]

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?%?")
#: Columns that say which problem a row is (part of its label), not a measurement.
_SIZE_HEADERS = {"L", "S", "B", "H", "E", "d", "size", "dtype"}
_UNITS = (("ms", "time (ms)"), ("MiB", "memory (MiB)"), ("FLOP/s", "throughput"))
#: More headline metrics than this repeat the table: the metrics panel is left out.
_MAX_METRICS = 12
_MARKERS = "osD^vP*X"
_LINESTYLES = ("-", "--", ":", "-.")
#: Metric names with these words are headline numbers worth a bar.
_HEADLINE = ("ratio", "speedup", "exponent", "reduction", "mib")


def numeric(cell):
    """The number a table cell shows (``"12.5"``, ``"+58.1%"`` -> 58.1), or ``None``.

    >>> numeric("12.50"), numeric("+58.1%"), numeric("64 (16d)"), numeric("-")
    (12.5, 58.1, None, None)
    """
    text = str(cell).strip()
    if not _NUMBER.fullmatch(text):
        return None
    return float(text.rstrip("%"))


def unit_of(header: str, cells=()) -> str:
    """The panel a column goes to: ``"time (ms)"``, ``"memory (MiB)"``, ``"percent"``, ...

    >>> unit_of("numba fwd ms"), unit_of("t=6 MiB"), unit_of("params"), unit_of("GFLOP/s")
    ('time (ms)', 'memory (MiB)', 'ratio', 'throughput')
    >>> unit_of("shared vs hamilton", ["+58.1%", "-75%"])
    'percent'
    """
    words = str(header).split()
    for suffix, unit in _UNITS:
        if words and (words[-1] == suffix or words[-1].endswith("G" + suffix)
                      or words[-1].endswith("T" + suffix)):
            return unit
    shown = [str(c).strip() for c in cells if numeric(c) is not None]
    if shown and all(c.endswith("%") for c in shown):
        return "percent"
    return "ratio"


def _value(cell, unit):
    """The plotted number of a cell (``None``: not plotted in this unit)."""
    if unit == "time (ms)" and not re.search(r"[.eE]", str(cell)):
        return None                        # an integer in a time column: a count
    return numeric(cell)


def _columns(result):
    """``(x column or None, label columns, {unit: [value columns]})``."""
    headers = [str(h) for h in result.headers]
    values = [[numeric(c) for c in row] for row in result.rows]
    is_num = [bool(values) and any(v[i] is not None for v in values)
              for i in range(len(headers))]
    x = None
    if "L" in headers:
        i = headers.index("L")
        if is_num[i] and len({v[i] for v in values if v[i] is not None}) >= 3:
            x = i
    labels = [i for i, h in enumerate(headers)
              if i != x and (not is_num[i] or h in _SIZE_HEADERS)]
    groups = {}
    for i, h in enumerate(headers):
        if i != x and i not in labels:
            unit = unit_of(h, [r[i] for r in result.rows])
            groups.setdefault(unit, []).append(i)
            for v, row in zip(values, result.rows):
                v[i] = _value(row[i], unit)
    return x, labels, groups, values


def _row_label(result, row, labels):
    headers = [str(h) for h in result.headers]
    parts = [f"{headers[i]}={row[i]}" if headers[i] in _SIZE_HEADERS else str(row[i])
             for i in labels if str(row[i]).strip()]
    return " ".join(parts) or "-"


def plain_log_ticks(axis):
    """Tick labels 1024, 0.5, 200 on a log axis instead of 2^10, 5x10^-1, 2x10^2."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def _lines(ax, result, x, cols, values, unit):
    headers = [str(h) for h in result.headers]
    for n, i in enumerate(cols):
        pts = [(v[x], v[i]) for v in values if v[x] is not None and v[i] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=_MARKERS[n % len(_MARKERS)],
                linestyle=_LINESTYLES[n % len(_LINESTYLES)], label=headers[i])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_ticks(ax.xaxis)
    plain_log_ticks(ax.yaxis)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(unit)
    ax.set_title(f"{unit} against L")
    ax.legend(fontsize=8)


def _bars(ax, result, labels, cols, values, unit):
    headers = [str(h) for h in result.headers]
    rows = [r for r, v in zip(result.rows, values) if any(v[i] is not None for i in cols)]
    vals = [v for v in values if any(v[i] is not None for i in cols)]
    names = [_row_label(result, r, labels) for r in rows]
    height = 0.8 / len(cols)
    ypos = np.arange(len(rows))
    for n, i in enumerate(cols):
        data = np.array([np.nan if v[i] is None else v[i] for v in vals])
        ax.barh(ypos + (n - (len(cols) - 1) / 2) * height, data, height=height,
                label=headers[i], hatch=("", "//", "..", "xx")[n % 4], edgecolor="0.3")
    ax.set_yticks(ypos, names, fontsize=8)
    ax.invert_yaxis()
    finite = np.array([v[i] for v in vals for i in cols if v[i] is not None], float)
    if finite.size and unit != "ratio" and finite.min() > 0 and finite.max() / finite.min() > 50:
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
    if unit in ("ratio", "percent"):
        ax.axvline(1.0 if unit == "ratio" else 0.0, color="k", lw=0.8)
    ax.set_xlabel(", ".join(headers[i] for i in cols) if len(cols) == 1 else unit)
    ax.set_title(unit + (" (line: 1 = parity)" if unit == "ratio" else ""))
    if len(cols) > 1:
        ax.legend(fontsize=8)


def _metrics(ax, result):
    items = [(k, float(v)) for k, v in result.metrics.items()
             if any(w in k.lower() for w in _HEADLINE) and np.isfinite(float(v))]
    items = items or [(k, float(v)) for k, v in result.metrics.items()
                      if np.isfinite(float(v))]
    if not items:
        ax.axis("off")
        ax.text(0.5, 0.5, "no metrics", ha="center", va="center")
        return
    names, vals = zip(*items)
    colors = ["C3" if v < 0 else "C0" for v in vals]
    ypos = np.arange(len(vals))
    ax.barh(ypos, vals, color=colors)
    for y, v in zip(ypos, vals):
        ax.text(v, y, f" {v:.3g}", va="center", ha="left" if v >= 0 else "right", fontsize=7)
    ax.set_yticks(ypos, names, fontsize=7)
    ax.invert_yaxis()
    title = "headline metrics"
    if any(w in " ".join(names) for w in ("ratio", "speedup", "exponent")):
        ax.axvline(1.0, color="k", lw=0.8, linestyle="--")
        title += " (dashed: 1 = parity, or linear for an exponent)"
    ax.axvline(0.0, color="0.5", lw=0.5)
    ax.set_title(title)


def plot_study(result, path, *, name, size):
    """Write ``result`` (a :class:`~refattn.bench.StudyResult`) as a PNG at ``path``."""
    from matplotlib.figure import Figure

    x, labels, groups, values = _columns(result)
    panels = list(groups.items())
    headline = [k for k in result.metrics if any(w in k.lower() for w in _HEADLINE)]
    with_metrics = 0 < len(headline or result.metrics) <= _MAX_METRICS or not panels
    n = len(panels) + with_metrics
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(5.5 * ncols, 4.6 * nrows + 0.6), layout="constrained")
    axes = np.ravel(fig.subplots(nrows, ncols, squeeze=False))
    for ax, (unit, cols) in zip(axes, panels):
        if x is not None:
            _lines(ax, result, x, cols, values, unit)
        else:
            _bars(ax, result, labels, cols, values, unit)
    if with_metrics:
        _metrics(axes[len(panels)], result)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(f"{name} (size {size}): {result.title}", fontsize=10)
    lines = ([f"target not met: {f}" for f in result.failures] or ["all targets met"])
    lines += [f"note: {n}" for n in result.notes[:3]]
    if not with_metrics:
        lines.append(f"its {len(result.metrics)} metrics are the table's numbers (refattn bench "
                     f"--json FILE lists them)")
    width = int(24 * ncols)
    caption = "\n".join(textwrap.shorten(t, width=3 * width, placeholder=" ...")
                        for t in lines)
    fig.text(0.01, -0.01, caption, ha="left", va="top", fontsize=8,
             color="C3" if result.failures else "0.2", wrap=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
