"""Sensitivity results on disk and on screen: NNI's CSV (write and read back), a PNG plot, a DataFrame."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .._io import atomic_write
from ..errors import ConfigError

Sensitivities = Mapping[str, Mapping[float, Any]]


def csv_bytes(sparsities: Sequence[float], sensitivities: Sensitivities) -> bytes:
    """NNI 2.10.1's export bytes: header ``layername,<str(s)...>``; one row per layer, values ordered by
    sparsity and written with ``str()``; early-stopped rows are shorter; ``\\r\\n`` line ends.

    >>> csv_bytes([0.25, 0.5], {"conv1": {0.25: 0.9, 0.5: 0.8}, "conv2": {0.25: 0.5}})
    b'layername,0.25,0.5\\r\\nconv1,0.9,0.8\\r\\nconv2,0.5\\r\\n'
    """
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["layername"] + [str(s) for s in sparsities])
    for layer, values in sensitivities.items():
        w.writerow([layer] + [values[s] for s in sorted(values)])
    return buf.getvalue().encode("utf-8")


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` atomically (temporary file, fsync, ``os.replace``; see :mod:`prunescope._io`)."""
    atomic_write(path, data)


def load_sensitivity(path: str | os.PathLike[str]) -> dict[str, dict[float, float]]:
    """Read a CSV written by ``export()`` (ours or NNI's) back into ``{layer: {sparsity: value}}``.

    Like NNI's ``SensitivityPruner.load_sensitivity``, values map by position onto the header's
    sparsities, which is how shorter (early-stopped) rows line up.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "s.csv")
    >>> with open(p, "wb") as f:
    ...     _ = f.write(b"layername,0.25,0.5\\r\\nconv1,0.9,0.8\\r\\nconv2,0.5\\r\\n")
    >>> load_sensitivity(p)
    {'conv1': {0.25: 0.9, 0.5: 0.8}, 'conv2': {0.25: 0.5}}
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != "layername":
        raise ConfigError(f"{os.fspath(path)!r} is not a sensitivity CSV (first cell must be 'layername')")
    try:
        sparsities = [float(x) for x in rows[0][1:]]
        out: dict[str, dict[float, float]] = {}
        for row in rows[1:]:
            if not row:
                continue
            if len(row) - 1 > len(sparsities):
                raise ConfigError(f"row {row[0]!r} of {os.fspath(path)!r} has more values than sparsities")
            out[row[0]] = {s: float(v) for s, v in zip(sparsities, row[1:])}
    except ValueError as e:
        raise ConfigError(f"malformed sensitivity CSV {os.fspath(path)!r}: {e}") from None
    return out


def to_dataframe(sensitivities: Sensitivities, baseline: float | None = None) -> Any:
    """Long-format ``pandas.DataFrame``: columns ``layer, sparsity, metric`` (and ``delta`` with a baseline)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_dataframe() needs pandas: pip install 'prunescope[table]'") from None
    rows = [(layer, float(s), float(v)) for layer, vals in sensitivities.items() for s, v in sorted(vals.items())]
    df = pd.DataFrame(rows, columns=["layer", "sparsity", "metric"])
    if baseline is not None:
        df["delta"] = df["metric"] - float(baseline)
    return df


#: line styles and markers combined with the 10 colours of ``tab10``: 40 curves before a (colour, style) pair
#: repeats, 320 before a (colour, style, marker) triple does
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def curve_style(i: int) -> dict[str, Any]:
    """Colour, line style and marker of the ``i``-th curve: unique for the first 320 curves (tab10 colours,
    then line styles, then markers), so that 20+ layers or sets stay tellable apart."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab10"](i % 10), "ls": LINESTYLES[(i // 10) % 4],
            "marker": MARKERS[(i // 40) % len(MARKERS)]}


def sensitivity_figure(sensitivities: Sensitivities, baseline: float | None = None,
                       title: str = "Pruning sensitivity", xlabel: str = "sparsity of the layer") -> Any:
    """The matplotlib figure :func:`plot` saves: one curve per layer in a style no other curve has, the
    baseline, and the legend outside the axes (right of them, in columns of at most 25 entries)."""
    import matplotlib.pyplot as plt

    n = len(sensitivities)
    cols = max(1, -(-n // 25))
    fig, ax = plt.subplots(figsize=(8 + 2.6 * cols, 5))
    try:
        for i, (layer, vals) in enumerate(sensitivities.items()):
            xs = sorted(vals)
            ax.plot([float(s) for s in xs], [float(vals[s]) for s in xs], ms=3, lw=1.2, label=layer,
                    **curve_style(i))
        if baseline is not None:
            ax.axhline(float(baseline), color="black", ls="--", lw=1, label="baseline (unpruned)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation metric")
        ax.set_title(title, parse_math=False)  # layer and model names are text, never mathtext ('a$x$')
        ax.grid(alpha=0.3)
        legend = ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                           ncol=cols)
        for text in legend.get_texts():
            text.set_parse_math(False)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def plot(sensitivities: Sensitivities, path: str | os.PathLike[str], baseline: float | None = None,
         title: str = "Pruning sensitivity", xlabel: str = "sparsity of the layer") -> None:
    """Write a PNG with one metric-vs-sparsity curve per layer and the unpruned baseline.

    Labels are literal text: a module name such as ``a$\\frac{x$`` is shown as written, not parsed as
    mathtext. Every curve has its own colour/line-style/marker combination and the legend sits outside the
    axes, so 20+ layers stay readable.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot() needs matplotlib: pip install 'prunescope[plot]'") from None
    fig = sensitivity_figure(sensitivities, baseline, title, xlabel)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_atomic(path, buf.getvalue())
