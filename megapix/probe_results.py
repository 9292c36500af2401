"""The results folder of `megapix probe`: linear and attentive rows side by side in probe_results.json and .md,
and probe_accuracy.png drawing both (megapix.probe and megapix.attentive write through here)."""
from __future__ import annotations

import os
import sys

from megapix.utils import atomic_path, read_json, write_json

RESULT_FILES = ("probe_results.json", "probe_results.md", "probe_accuracy.png")


def merge_results(out: str, rows: list[dict], info: dict) -> dict:
    """The summary for `out`: `rows` (all of one probe kind, "linear" or "attentive") replace that kind's rows in
    out's earlier probe_results.json and keep the other kind's; `info` updates the summary's fields."""
    kind = rows[0]["probe"]
    path = os.path.join(out, RESULT_FILES[0])
    old = read_json(path) if os.path.isfile(path) else None
    if os.path.isfile(path) and not (isinstance(old, dict) and isinstance(old.get("results"), list)):
        print(f"megapix probe: warning: {path} is not a probe results record; it is replaced (its rows are lost)",
              file=sys.stderr, flush=True)
        old = None
    kept = [r for r in (old or {}).get("results", []) if isinstance(r, dict) and r.get("probe", "linear") != kind]
    summary = {k: v for k, v in (old or {}).items() if k != "results"}
    summary.update(info)
    summary["results"] = kept + rows if kind == "attentive" else rows + kept
    return summary


def write_outputs(out: str, summary: dict, control: dict | None = None, prefix: str = "megapix probe") -> None:
    """probe_results.json, probe_results.md and probe_accuracy.png in `out`; the table printed, the paths named."""
    written = [os.path.join(out, n) for n in RESULT_FILES]
    write_json(written[0], summary)
    md = markdown_table(summary)
    with atomic_path(written[1]) as tmp:
        with open(tmp, "w") as f:
            f.write(md)
    with atomic_path(written[2]) as tmp:
        plot(summary, tmp, control)
    print(md, flush=True)
    for path in written:
        print(f"{prefix}: wrote {os.path.abspath(path)}", flush=True)


def markdown_table(summary: dict) -> str:
    """The linear rows' table, then the attentive rows' (each present only when it has rows)."""
    linear = [r for r in summary["results"] if r.get("probe", "linear") == "linear"]
    attentive = [r for r in summary["results"] if r.get("probe") == "attentive"]
    pct = lambda r, k: f"{100 * r[k]:.2f}" if k in r else "-"  # noqa: E731
    lines = []
    if linear:
        c = summary.get("counts", {})
        lines += [f"Linear probes ({summary.get('solver')}; l2 by val, test from a train+val refit); "
                  f"{c.get('train')}/{c.get('val')}/{c.get('test')} rows", "",
                  "| probe | layers | dim | l2 | val acc % | test acc % |", "|---|---|---|---|---|---|"]
        for r in linear:
            lines.append(f"| {r['name']} | {_layer_span(r['layers'])} | {r['dim']} | {r['l2']:g} | "
                         f"{pct(r, 'val_acc')} | {pct(r, 'test_acc')} |")
    if attentive:
        a = summary.get("attentive", {})
        lines += ([""] if lines else []) + [
            f"Attentive probes (attention pooling over the frozen model; lr and epoch by val; layers by "
            f"{a.get('selection', '?')})", "",
            "| probe | layers | lr | epoch | val acc % | test acc % |", "|---|---|---|---|---|---|"]
        for r in attentive:
            lines.append(f"| {r['name']} | {_layer_span(r['layers'])} | {r['lr']:g} | {r['epoch']} | "
                         f"{pct(r, 'val_acc')} | {pct(r, 'test_acc')} |")
    return "\n".join(lines) + "\n"


def _layer_span(ls) -> str:
    contiguous = ls == list(range(ls[0], ls[-1] + 1))
    return str(ls[0]) if len(ls) == 1 else f"{ls[0]}..{ls[-1]}" if contiguous else ",".join(map(str, ls))


def probe_label(layers) -> str:
    """'layer 3', 'layers 1-5 concatenated' or 'layers 0,2,4 concatenated'."""
    ls = list(layers)
    if len(ls) == 1:
        return f"layer {ls[0]}"
    span = f"{ls[0]}-{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) else ",".join(map(str, ls))
    return f"layers {span} concatenated"


def plot(summary: dict, path: str, control: dict | None = None) -> str:
    """Accuracy against layer (the paper's figure 3 shape, `figure`) written to `path`; returns the path."""
    figure(summary, control).savefig(path, format="png")
    return path


def figure(summary: dict, control: dict | None = None):
    """Accuracy against layer on a 0-100% axis with a chance line; concatenations as horizontal lines; `control`
    (the probe_results of a random-init model's dump) as a second curve. A matplotlib Figure drawn without pyplot,
    so the caller's backend and figures are left alone."""
    # lazy: matplotlib costs ~0.3 s to import and only a probe that plots needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def singles_of(s):
        rs = sorted((r for r in s["results"] if len(r["layers"]) == 1 and r.get("probe", "linear") == "linear"),
                    key=lambda r: r["layers"][0])
        return [r["layers"][0] for r in rs], rs

    xs, singles = singles_of(summary)
    attentive = sorted((r for r in summary["results"] if r.get("probe") == "attentive"), key=lambda r: r["layers"][0])
    scored = singles or attentive
    key = "test_acc" if scored and all("test_acc" in r for r in scored) else "val_acc"
    split = key[:-4]
    fig = Figure(figsize=(6.5, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if singles:
        ax.plot(xs, [100 * r["val_acc"] for r in singles], "o-", label="pretrained, val (train-only fit)")
    if singles and key == "test_acc":
        ax.plot(xs, [100 * r["test_acc"] for r in singles], "s-", label="pretrained, test (train+val refit)")
    ticks = set(xs)
    if control:
        cxs, csingles = singles_of(control)
        ckey = key if all(key in r for r in csingles) else "val_acc"
        ax.plot(cxs, [100 * r[ckey] for r in csingles], "^--", color="tab:red",
                label=f"random init (control), {ckey[:-4]}")
        ticks |= set(cxs)
    if attentive:
        akey = key if all(key in r for r in attentive) else "val_acc"
        ax.plot([r["layers"][0] for r in attentive], [100 * r[akey] for r in attentive], "D-", color="tab:purple",
                label=f"attentive probe, {akey[:-4]}")
        ticks |= {r["layers"][0] for r in attentive}
    concats = [r for r in summary["results"] if len(r["layers"]) > 1 and r.get("probe", "linear") == "linear"]
    for r, style in zip(concats, ("--", "-.", ":")):
        k = key if key in r else "val_acc"
        ax.axhline(100 * r[k], linestyle=style, color="tab:green", label=f"{probe_label(r['layers'])} ({k[:-4]})")
    n_classes = summary.get("num_classes")
    if n_classes:
        ax.axhline(100 / n_classes, color="black", linestyle=":", linewidth=1, label=f"chance ({100 / n_classes:.0f}%)")
    model = summary.get("model") or {}
    n_layer = model.get("n_layer")
    ax.set_xticks(sorted(ticks))
    last = f"; {n_layer} = after the final norm" if n_layer is not None else ""
    ax.set_xlabel(f"layer (input of block l, normed{last})")
    ax.set_ylabel(f"probe accuracy (%), {split}")
    ax.set_ylim(0, 100)
    kinds = ("linear and attentive probes" if singles else "attentive probe") if attentive else "linear probe"
    ax.set_title(f"{kinds} by depth ({n_layer if n_layer is not None else '?'} layers, d={model.get('d_model', '?')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
