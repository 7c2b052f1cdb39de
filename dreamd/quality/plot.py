"""`dreamd stats --plot FILE.png`: the dream's health as curves over time, one figure of
stacked panels sharing the time axis: motion and flicker, pops, the keyframes' colour
against their reference, brightness and contrast, drift and change, the aesthetic
memory's similarity (its collapse measure) and injections. Reads the ledger through the
read model (`quality_series`); draws with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from dreamd.ledger.read_model import POP_RATIO, STAGNANT_CHANGE

WIDTH_IN, PANEL_IN, DPI = 11.0, 2.0, 100      # 1100 px wide, 200 px a panel
LAB_COLOURS = {"L": "black", "a": "tab:red", "b": "tab:blue"}


def _times(rows: list[dict[str, Any]]) -> list[datetime]:
    return [datetime.fromisoformat(str(r["created_at"])) for r in rows]


def _values(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)


def similarity(vectors: list[bytes], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarity of each keyframe to the previous one, the mean pairwise similarity
    of the `window` keyframes ending at each one: the memory's collapse measure, as
    dreamd/memory/stats.py computes it), NaN where not defined."""
    n = len(vectors)
    consecutive, recent = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0:
        return consecutive, recent
    v = np.stack([np.frombuffer(b, dtype="<f4") for b in vectors]).astype(float)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    consecutive[1:] = np.einsum("ij,ij->i", v[1:], v[:-1])
    if window >= 2:
        upper = np.triu_indices(window, 1)
        for end in range(window, n + 1):
            block = v[end - window:end]
            recent[end - 1] = (block @ block.T)[upper].mean()
    return consecutive, recent


def _model(rows: list[dict[str, Any]], model: str | None) -> str | None:
    if model:
        return model
    counts = Counter(r["model"] for r in rows)
    return counts.most_common(1)[0][0] if counts else None


def draw(cfg, out: str | Path, *, window: int = 8, model: str | None = None,
         collapse: float | None = None, since: datetime | None = None) -> Path:
    """Draw the figure from the ledger of `cfg` into the PNG `out`; returns its path.
    `model`: whose vectors the similarity panel compares (default: the model with the
    most embedded keyframes); `collapse`: that model's collapse threshold, drawn as a
    line (`dreamd stats` passes the aesthetic memory's)."""
    from dreamd.ledger import read_model

    conn = read_model.connect(cfg.db_path)
    try:
        series = read_model.quality_series(conn, since)
    finally:
        conn.close()
    model = _model(series["vectors"], model)
    vectors = [r for r in series["vectors"] if r["model"] == model]
    return render(series, out, window=window, model=model, vectors=vectors,
                  collapse=collapse)


def render(series: dict[str, list[dict[str, Any]]], out: str | Path, *, window: int,
           model: str | None, vectors: list[dict[str, Any]],
           collapse: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")               # files only: no display, no GUI toolkit
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    seg, key = series["segments"], series["keyframes"]
    fig, axes = plt.subplots(7, 1, sharex=True, figsize=(WIDTH_IN, PANEL_IN * 7), dpi=DPI,
                             layout="constrained")
    (motion, pops, colour, light, drift, sims, inject) = axes
    fig.suptitle(f"dream health: {len(seg)} segments, {len(key)} keyframes", fontsize=12)

    ts, tk = _times(seg), _times(key)
    motion.plot(ts, _values(seg, "motion"), lw=1, label="motion")
    motion.plot(ts, _values(seg, "flicker"), lw=1, label="flicker")
    motion.set_ylabel("levels / frame")
    motion.set_title("segments: mean change between frames, and its second difference",
                     fontsize=9, loc="left")

    ratio = _values(seg, "pop")
    popped = ratio >= POP_RATIO
    pops.plot(ts, ratio, lw=0.8, color="tab:gray", label="boundary / typical step")
    pops.scatter(np.array(ts, dtype=object)[popped], ratio[popped], color="tab:red", s=12,
                 zorder=3, label=f"pops ({int(popped.sum())})")
    pops.axhline(POP_RATIO, color="tab:red", ls=":", lw=1)
    if np.nanmax(ratio, initial=0) > 10 * POP_RATIO:
        pops.set_yscale("log")
    pops.set_ylabel("ratio")
    pops.set_title(f"the jump at each keyframe boundary (pop at >= {POP_RATIO:g}x)",
                   fontsize=9, loc="left")

    for name, column, ref in (("L", "lab_l", "reference_l"), ("a", "lab_a", "reference_a"),
                              ("b", "lab_b", "reference_b")):
        c = LAB_COLOURS[name]
        colour.plot(tk, _values(key, column), lw=1, color=c, label=name)
        colour.plot(tk, _values(key, ref), lw=1, color=c, ls="--", alpha=0.6)
    colour.set_ylabel("CIELAB")
    colour.set_title("keyframe colour (solid) against its run's reference (dashed)",
                     fontsize=9, loc="left")

    light.plot(tk, _values(key, "brightness"), lw=1, label="brightness (RGB mean)")
    light.plot(tk, _values(key, "contrast"), lw=1, label="contrast (RGB std)")
    light.set_ylabel("0-255")
    light.set_title("keyframe brightness and contrast", fontsize=9, loc="left")

    drift.plot(tk, _values(key, "drift"), lw=1, label="drift from reference")
    drift.plot(tk, _values(key, "change"), lw=1, label="change from previous")
    drift.axhline(STAGNANT_CHANGE, color="tab:gray", ls=":", lw=1,
                  label=f"stagnant below {STAGNANT_CHANGE:g}")
    for i, b in enumerate(series["breaks"]):
        drift.axvline(datetime.fromisoformat(str(b["created_at"])), color="tab:purple",
                      lw=0.8, label="stagnation break" if i == 0 else None)
    drift.set_ylabel("delta E")
    drift.set_title("keyframe drift and change", fontsize=9, loc="left")

    consecutive, recent = similarity([r["vector"] for r in vectors], window)
    tv = _times(vectors)
    sims.plot(tv, consecutive, lw=0.8, alpha=0.7, label="consecutive keyframes")
    sims.plot(tv, recent, lw=1.2, label=f"mean of the last {window} (collapse measure)")
    if collapse is not None:
        sims.axhline(collapse, color="tab:red", ls=":", lw=1, label=f"collapse at {collapse:g}")
    sims.set_ylabel("cosine")
    sims.set_title(f"aesthetic memory similarity ({model or 'nothing embedded'})", fontsize=9,
                   loc="left")

    kinds = sorted({f"{r['kind']}/{r['reason']}" for r in series["injections"]})
    for y, kind in enumerate(kinds):
        at = [datetime.fromisoformat(str(r["created_at"])) for r in series["injections"]
              if f"{r['kind']}/{r['reason']}" == kind]
        inject.plot(at, [y] * len(at), "|", ms=12, mew=1.5, label=f"{kind} ({len(at)})")
    inject.set_yticks(range(len(kinds)), kinds, fontsize=8)
    inject.set_ylim(-0.8, max(len(kinds), 1) - 0.2)
    inject.set_title(f"injections ({len(series['injections'])})", fontsize=9, loc="left")

    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", ncols=4)
    locator = mdates.AutoDateLocator()
    inject.xaxis.set_major_locator(locator)
    inject.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    inject.set_xlabel("time (UTC)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    # lines on white need few colours: a 256-colour palette is a third of the size
    from PIL import Image
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(256, dither=Image.Dither.NONE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    small.save(out, format="PNG", optimize=True)
    return out
