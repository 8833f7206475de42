"""Outputs of an analysis: ``analysis.json``, PNG plots and a markdown section.

:func:`markdown_section` turns an analysis dict (as returned by
:func:`rankwise.analysis.analyze_runs` or read back from ``analysis.json``) into
a markdown section that ``rankwise demo`` appends to its report.
"""
from __future__ import annotations

import io
import json
import math
import os

from ..atomic import atomic_write_bytes

__all__ = ["write_json", "write_plots", "markdown_section", "write_outputs"]

PLOTS = {
    "spectra": "spectra.png",
    "rank_norm": "effective_rank_and_norm.png",
    "intruders": "intruders.png",
    "attention": "attention.png",
    "cka": "cka.png",
    "kl": "token_kl.png",
    "restoration": "restoration.png",
}




def _clean(x):
    """JSON-safe copy: NaN/inf become None, tuples lists, keys strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(analysis: dict, path: str) -> None:
    """Write ``analysis`` to ``path`` atomically (NaN written as null)."""
    atomic_write_bytes(path, (json.dumps(_clean(analysis), indent=1) + "\n").encode())


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _x_positions(runs):
    """x coordinates for 'vs rank' plots: log2(rank) for LoRA runs, SFT runs to the right."""
    lora = [r for r in runs if r.get("rank")]
    xs, labels = [], []
    right = (max(math.log2(r["rank"]) for r in lora) + 1.5) if lora else 0.0
    for r in runs:
        if r.get("rank"):
            xs.append(math.log2(r["rank"]))
        else:
            xs.append(right)
            right += 1.0
        labels.append(r.get("label") or r["name"])
    return xs, labels


def _integer_ticks(axis) -> None:
    """Integer-only major ticks on a matplotlib ``axis``."""
    from matplotlib.ticker import MaxNLocator  # heavy: matplotlib, loaded only when plots are drawn

    axis.set_major_locator(MaxNLocator(integer=True))


def _spectra_figure(plt, runs):
    """Singular value spectra (mean over matrices of σ_i / σ_1) by run; ``None`` when no run has one."""
    fig, ax = plt.subplots(figsize=(6, 4))
    any_line = False
    for r in runs:
        s = r["spectral"].get("mean_normalized_spectrum") or []
        pos = []
        for v in s:  # stop at the numerical floor (rank-r updates have σ_i ≈ 0 beyond r)
            if v is None or v < 1e-6:
                break
            pos.append(v)
        if pos:
            ax.semilogy(range(1, len(pos) + 1), pos, marker=".", label=r.get("label") or r["name"])
            any_line = True
    if not any_line:
        plt.close(fig)
        return None
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("mean σ_i / σ_1 of ΔW")
    ax.set_title("Update spectra")
    ax.legend(fontsize=8)
    return fig


def _rank_norm_figure(plt, runs, xs, labels):
    """Mean effective rank and total update norm of ΔW vs LoRA rank, SFT runs to the right."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "mean_effective_rank", "mean effective rank of ΔW"),
                           (axes[1], "update_norm", "‖ΔW‖_F (all matrices)")):
        ys = [r["spectral"].get(key) for r in runs]
        ys = [y if y is not None else float("nan") for y in ys]
        lo = [(x, y) for x, y, r in zip(xs, ys, runs) if r.get("rank")]
        if lo:
            ax.plot([p[0] for p in lo], [p[1] for p in lo], "o-", label="LoRA")
        sft = [(x, y) for x, y, r in zip(xs, ys, runs) if not r.get("rank")]
        if sft:
            ax.plot([p[0] for p in sft], [p[1] for p in sft], "s", color="C3", label="SFT")
        ax.legend(fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=30, fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("LoRA rank (log scale) / SFT")
    return fig


def _intruders_figure(plt, runs, labels, settings):
    """Intruder dimensions summed over matrices, one bar per run; ``None`` unless every run has them."""
    if not all("intruders_total" in r["spectral"] for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = [r["spectral"]["intruders_total"] for r in runs]
    bars = ax.bar(range(len(runs)), counts)
    ax.bar_label(bars, fontsize=8)
    ax.set_ylim(0, max(1, max(counts)) * 1.15)
    _integer_ticks(ax.yaxis)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, rotation=30, fontsize=8)
    ax.set_ylabel(f"intruder dimensions (k={settings.get('intruder_k')}, ε={settings.get('intruder_eps')})")
    ax.set_title("Intruder dimensions, summed over matrices")
    return fig


def _attention_figure(plt, probed):
    """Attention entropy and base-vs-tuned JS distance per layer (means over heads); ``None`` without data."""
    att = [r for r in probed if r["probe"].get("attention")]
    if not att:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    a0 = att[0]["probe"]["attention"]
    layers = range(len(a0["entropy_base"]))
    axes[0].plot(layers, [sum(h) / len(h) for h in a0["entropy_base"]], "k--", label="base")
    for r in att:
        a = r["probe"]["attention"]
        lab = r.get("label") or r["name"]
        axes[0].plot(layers, [sum(h) / len(h) for h in a["entropy_tuned"]], marker=".", label=lab)
        axes[1].plot(layers, [sum(h) / len(h) for h in a["js_distance"]], marker=".", label=lab)
    axes[0].set_title("attention entropy (mean over heads, nats)")
    axes[1].set_title("JS distance base vs tuned (mean over heads)")
    for ax in axes:
        ax.set_xlabel("layer")
        _integer_ticks(ax.xaxis)
        ax.legend(fontsize=8)
    return fig


def _cka_figure(plt, probed):
    """Linear CKA of base and tuned hidden states per layer; ``None`` without data."""
    rep = [r for r in probed if r["probe"].get("representations")]
    if not rep:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rep:
        c = [v if v is not None else float("nan") for v in r["probe"]["representations"]["cka"]]
        ax.plot(range(len(c)), c, marker=".", label=r.get("label") or r["name"])
    ax.set_xlabel("hidden state (0 = embeddings)")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("linear CKA base vs tuned")
    ax.set_title("Representation similarity per layer")
    ax.legend(fontsize=8)
    return fig


def _kl_figure(plt, probed):
    """Mean first-answer-token KL per mastery bucket, one bar group per bucket; ``None`` without data."""
    tok = [r for r in probed if r["probe"].get("tokens")]
    if not tok:
        return None
    buckets = sorted({b for r in tok for b in r["probe"]["tokens"]["by_bucket"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(buckets) + 3), 4))
    w = 0.8 / len(tok)
    for i, r in enumerate(tok):
        by = r["probe"]["tokens"]["by_bucket"]
        ax.bar([j + i * w for j in range(len(buckets))], [by.get(b, {}).get("mean", 0.0) for b in buckets],
               width=w, label=r.get("label") or r["name"])
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(buckets))])
    ax.set_xticklabels(buckets)
    ax.set_ylabel("KL(tuned top-10 ‖ base), first answer token")
    ax.set_title("Token-level shift per mastery bucket")
    ax.legend(fontsize=8)
    return fig


def _restoration_figure(plt, runs):
    """Restoration curves: one panel per (run, eval set), accuracy vs restored fraction; ``None`` without data."""
    rest = [r for r in runs if r.get("restoration")]
    if not rest:
        return None
    sets = list(rest[0]["restoration"]["baseline"]["tuned"])
    fig, axes = plt.subplots(len(rest), len(sets), figsize=(5 * len(sets), 3.8 * len(rest)), squeeze=False)
    for ri, r in enumerate(rest):
        res = r["restoration"]
        for si, name in enumerate(sets):
            ax = axes[ri][si]
            for sel, curves in res["curves"].items():
                pts = curves.get(name, [])
                ax.plot([100 * p["fraction"] for p in pts], [100 * p["mean"] for p in pts], marker="o", label=sel)
            tuned_acc = 100 * res["baseline"]["tuned"][name]["mean"]
            base_acc = 100 * res["baseline"]["base"][name]["mean"]
            ax.axhline(tuned_acc, color="k", ls="--", lw=1, label="tuned")
            ax.axhline(base_acc, color="gray", ls=":", lw=1, label="base")
            top = max([tuned_acc, base_acc] + [100 * p["mean"] for c in res["curves"].values() for p in c.get(name, [])])
            ax.set_ylim(0, max(5.0, min(100.0, top * 1.15)))
            ax.set_xscale("log")
            ax.set_xticks([100 * f for f in res["fractions"]])
            ax.set_xticklabels([f"{100 * f:g}" for f in res["fractions"]])
            ax.minorticks_off()
            ax.set_xlabel("restored fraction of updates (%)")
            ax.set_ylabel("accuracy (%), mean over buckets")
            ax.set_title(f"{r['name']}: {name}")
            ax.legend(fontsize=8)
    return fig


def write_plots(analysis: dict, out_dir: str) -> dict:
    """Write the PNG plots that the data supports; returns ``{plot: filename}``."""
    import matplotlib  # heavy: matplotlib, loaded only when plots are written

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # heavy at import: matplotlib

    runs = analysis.get("runs", [])
    written = {}
    if not runs:
        return written

    def done(key, fig):
        if fig is None:  # the data does not support this plot
            return
        fig.tight_layout()
        _save(fig, os.path.join(out_dir, PLOTS[key]))
        plt.close(fig)
        written[key] = PLOTS[key]

    xs, labels = _x_positions(runs)
    probed = [r for r in runs if r.get("probe")]
    done("spectra", _spectra_figure(plt, runs))
    done("rank_norm", _rank_norm_figure(plt, runs, xs, labels))
    done("intruders", _intruders_figure(plt, runs, labels, analysis.get("settings", {})))
    done("attention", _attention_figure(plt, probed))
    done("cka", _cka_figure(plt, probed))
    done("kl", _kl_figure(plt, probed))
    done("restoration", _restoration_figure(plt, runs))
    return written


def _fmt(v, nd=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{nd}f}"
    return str(v)


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _summary_lines(analysis: dict) -> list:
    """The opening paragraph, the one-row-per-run table of headline numbers, and what its columns mean."""
    runs = analysis["runs"]
    s = analysis.get("settings", {})
    lines = ["## Analysis", ""]
    lines.append(f"Base model `{analysis.get('base')}`; {len(runs)} run(s); device {analysis.get('device')}; "
                 f"{s.get('probe_rows', 0)} probe prompts. ΔW is `scaling · B·A` for LoRA and "
                 "`W_tuned − W_base` for SFT; statistics are over the weight matrices of the transformer layers.")
    lines.append("")
    head = ["run", "method", "rank", "‖ΔW‖_F", "eff. rank", "stable rank", "intruders", "top-k sv sim",
            "JS attn", "CKA", "KL 1st token"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in runs:
        sp = r["spectral"]
        pr = r.get("probe") or {}
        js = cka = kl = None
        if pr.get("attention"):
            js = _mean([_mean(h) for h in pr["attention"]["js_distance"]])
        if pr.get("representations"):
            cka = _mean(pr["representations"]["cka"][1:])
        if pr.get("tokens"):
            kl = pr["tokens"]["overall"]["mean"]
        lines.append("| " + " | ".join([
            r["name"], r["method"], _fmt(r.get("rank")), _fmt(sp.get("update_norm")),
            _fmt(sp.get("mean_effective_rank"), 2), _fmt(sp.get("mean_stable_rank"), 2),
            _fmt(sp.get("intruders_total")), _fmt(sp.get("mean_top_sv_similarity")),
            _fmt(js), _fmt(cka), _fmt(kl, 4)]) + " |")
    lines.append("")
    lines.append(f"Intruder dimensions: top-{s.get('intruder_k')} left singular vectors of W_tuned whose largest "
                 f"|cos| with any base singular vector is below {s.get('intruder_eps')}, summed over matrices. "
                 "JS attn: mean Jensen–Shannon distance (bits) between base and tuned attention rows; "
                 "CKA: mean linear CKA of hidden states over layers; KL: KL(tuned top-10 ‖ base) at the first "
                 "answer token.")
    lines.append("")
    return lines


def _token_kl_lines(runs: list) -> list:
    """A table of mean first-answer-token KL per mastery bucket, for the runs with token results."""
    tok = [r for r in runs if (r.get("probe") or {}).get("tokens")]
    if not tok:
        return []
    buckets = sorted({b for r in tok for b in r["probe"]["tokens"]["by_bucket"]})
    lines = ["### Token-level KL per bucket", "",
             "| run | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
    for r in tok:
        by = r["probe"]["tokens"]["by_bucket"]
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(by.get(b, {}).get("mean"), 4) for b in buckets) + " |")
    lines.append("")
    return lines


def _subspace_lines(sub: list) -> list:
    """A table of φ(1, 1) and φ(r_a, r_b) for every pair of LoRA runs."""
    if not sub:
        return []
    lines = ["### Subspace similarity of LoRA A matrices", "",
             "φ(i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j) of the top right singular vectors, mean over modules.", "",
             "| pair | φ(1, 1) | φ(r_a, r_b) |", "|---|---|---|"]
    for p in sub:
        lines.append(f"| {p['a']} vs {p['b']} | {_fmt(p['phi'][0][0])} | {_fmt(p['phi'][-1][-1])} |")
    lines.append("")
    return lines


def _restoration_lines(run: dict) -> list:
    """One run's restoration curves: per eval set, accuracy by selection and fraction, and per bucket."""
    res = run["restoration"]
    lines = [f"### Restoration curve: {run['name']}", "",
             "Accuracy (%, unweighted mean over buckets) after restoring k% of the updates to base values.", ""]
    for name in res["baseline"]["tuned"]:
        fr = res["fractions"]
        lines.append(f"**{name}** (tuned {100 * res['baseline']['tuned'][name]['mean']:.1f}, "
                     f"base {100 * res['baseline']['base'][name]['mean']:.1f})")
        lines.append("")
        lines.append("| selection | " + " | ".join(f"{100 * f:g}%" for f in fr) + " |")
        lines.append("|---|" + "---|" * len(fr))
        for sel, curves in res["curves"].items():
            lines.append(f"| {sel} | " + " | ".join(f"{100 * p['mean']:.1f}" for p in curves[name]) + " |")
        lines.append("")
        lines += _restoration_bucket_lines(res, name)
    return lines


def _restoration_bucket_lines(res: dict, name: str) -> list:
    """Per mastery bucket accuracy on eval set ``name`` for the main selection (``top`` when present)."""
    fr = res["fractions"]
    sel0 = "top" if "top" in res["curves"] else next(iter(res["curves"]), None)
    pts = res["curves"][sel0][name] if sel0 else []
    buckets = list(res["baseline"]["tuned"][name]["by_bucket"])
    if not (pts and len(buckets) > 1):
        return []
    lines = [f"Per bucket ({sel0} selection):", ""]
    lines.append("| bucket | tuned | " + " | ".join(f"{100 * f:g}%" for f in fr) + " |")
    lines.append("|---|---|" + "---|" * len(fr))
    for b in buckets:
        t = 100 * res["baseline"]["tuned"][name]["by_bucket"][b]
        lines.append(f"| {b} | {t:.1f} | " + " | ".join(
            f"{100 * p['by_bucket'].get(b, float('nan')):.1f}" for p in pts) + " |")
    lines.append("")
    return lines


def _image_links(files: dict, out_dir: str, rel: str) -> str:
    """Markdown image links to the plots in ``files``, relative to the directory ``rel``."""
    def img(key, alt):
        if key not in files:
            return ""
        p = os.path.relpath(os.path.join(out_dir, files[key]), rel).replace(os.sep, "/")
        return f"![{alt}]({p})\n\n"

    body = img("spectra", "update spectra") + img("rank_norm", "effective rank and norm vs rank")
    body += img("intruders", "intruder dimensions") + img("attention", "attention entropy and drift")
    body += img("cka", "CKA per layer") + img("kl", "token KL per bucket") + img("restoration", "restoration curves")
    return body


def markdown_section(analysis: dict, out_dir: str, relative_to: str | None = None) -> str:
    """A markdown section summarising ``analysis`` with its plots.

    Args:
        analysis: the dict returned by ``analyze_runs`` (or loaded from ``analysis.json``).
        out_dir: the directory holding the plots.
        relative_to: directory of the document the section goes into (image links are
            relative to it); defaults to ``out_dir``.

    Returns:
        Markdown text starting with a ``## Analysis`` heading.
    """
    if not isinstance(analysis, dict) or "runs" not in analysis:
        raise ValueError("analysis must be the dict returned by analyze_runs (with a 'runs' entry)")
    rel = relative_to if relative_to is not None else out_dir
    files = analysis.get("files", {}).get("plots", {})
    runs = analysis["runs"]
    lines = _summary_lines(analysis)
    lines += _token_kl_lines(runs)
    lines += _subspace_lines(analysis.get("subspace_similarity") or [])
    for r in runs:
        if r.get("restoration"):
            lines += _restoration_lines(r)
    for note in analysis.get("notes", []):
        lines.append(f"Note: {note}")
        lines.append("")
    return "\n".join(lines) + "\n" + _image_links(files, out_dir, rel)


def write_outputs(analysis: dict, out_dir: str, plots: bool = True) -> dict:
    """Write plots, ``analysis.json`` and ``analysis.md`` into ``out_dir``; records them in ``analysis["files"]``."""
    os.makedirs(out_dir, exist_ok=True)
    written = write_plots(analysis, out_dir) if plots else {}
    analysis["files"] = {"json": "analysis.json", "markdown": "analysis.md", "plots": written}
    write_json(analysis, os.path.join(out_dir, "analysis.json"))
    atomic_write_bytes(os.path.join(out_dir, "analysis.md"), markdown_section(analysis, out_dir).encode())
    return analysis["files"]
