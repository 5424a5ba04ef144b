"""``write_report(run_dir)``: ``<run_dir>/report.md`` with PNG plots, from what the stages left on disk.

Reads only files (``manifest.json``, ``eval/<label>/<task>.json``, ``merged/merge.json``, ``experts/*/metrics.json``,
``synth/manifest.json``, ``search/instructions.json``), so ``stm-ray report RUN_DIR`` regenerates it at any time, for
a finished or a partial run. Plots (matplotlib, Agg)::

    <run_dir>/report/ndcg_per_task.png     NDCG@10 on the test split per task: base, every expert, merged
    <run_dir>/report/merge_trials.png      merge search: each expert's coefficient vs the trial's dev NDCG@10
    <run_dir>/report/throughput.png        synthesis (generated tokens/s, rows/s) and training (samples/s per expert)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stm_ray.records import MANIFEST, read_record
from stm_ray.tables import format_table
from stm_ray.utils import atomic_write_text, save_figure

log = logging.getLogger(__name__)


def ndcg_table(run_dir: Path) -> tuple[list[str], dict[str, dict[str, float]], str]:
    """``(tasks, {label: {task: ndcg, "mean": ...}}, split)`` from the evaluate stage's counts, else from the
    mteb-format files under ``eval/``. Labels in order: base, experts, merged."""
    manifest = read_record(run_dir / MANIFEST, kind="run manifest") or {}
    tasks = list(((manifest.get("config") or {}).get("data") or {}).get("tasks") or [])
    ev = ((manifest.get("stages") or {}).get("evaluate") or {}).get("counts") or {}
    table: dict[str, dict[str, float]] = {k: dict(v) for k, v in (ev.get("ndcg_at_10") or {}).items()}
    split = ev.get("split", "test")
    if not table and (run_dir / "eval").is_dir():
        from stm_ray.eval.evaluate import result_path

        for d in sorted(p for p in (run_dir / "eval").iterdir() if p.is_dir()):
            row = {}
            for t in tasks:
                res = read_record(result_path(d, t), kind="evaluation result")
                if res and split in res.get("scores", {}):
                    row[t] = res["scores"][split][0]["ndcg_at_10"]
            if row:
                row["mean"] = sum(row.values()) / len(row) if len(row) == len(tasks) else float("nan")
                table[d.name] = row
    order = sorted(table, key=lambda lb: (lb != "base", lb == "merged", lb))
    return tasks, {lb: table[lb] for lb in order}, split


def area_names(tasks: list[str], run_dir: Path | None = None) -> dict[str, str]:
    """A readable name per task spec: icd10 chapter groups get their chapters' short titles; a docs: task says
    that its queries are synthetic (and, with ``run_dir``, whether its test split is too)."""
    names = {}
    for t in tasks:
        if t.startswith("docs:"):
            from stm_ray.data.docs import NESTED_KINDS, synthetic_record

            src = t[5:]
            inner = area_names([src])[src] if src.partition(":")[0] in NESTED_KINDS else Path(src.rstrip("/")).name
            rec = synthetic_record(run_dir, t) if run_dir is not None else None
            test = ((rec or {}).get("result") or {}).get("test")
            names[t] = f"{inner} (" + ("synthetic train, real test" if test == "real" else
                                       "synthetic queries, test too" if test == "synthetic" else
                                       "synthetic queries") + ")"
        elif t.startswith("icd10:"):
            names[t] = f"ICD-10 ch. {t[6:]}"
        elif t.startswith("beir:"):
            names[t] = Path(t[5:].rstrip("/")).name
        else:
            names[t] = t
    return names


def _wrap(label: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width=max(width, 8), break_on_hyphens=False)) or label


def _bar_figure(tasks: list[str], table: dict[str, dict[str, float]], title: str, run_dir: Path | None = None):
    """NDCG@10 per task and model: one group of bars per task (plus the mean), task names wrapped to their
    group's width, the legend above the axes (never on the bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = area_names(tasks, run_dir)
    cols = [*tasks, "mean"]
    labels = list(table)
    x = np.arange(len(cols))
    width = 0.8 / max(len(labels), 1)
    group_in = max(1.6, 0.55 * len(labels) + 0.4)  # inches per task group
    fig, ax = plt.subplots(figsize=(max(6.0, group_in * len(cols) + 1.2), 4.8))
    colors = {"base": "#9e9e9e", "merged": "#d62728"}
    for i, lb in enumerate(labels):
        vals = [table[lb].get(c, float("nan")) for c in cols]
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=lb, color=colors.get(lb))
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals], fontsize=7, rotation=90, padding=2)
    chars = int(group_in * 72 / 7.0 * 0.9)  # characters of 9 pt text that fit a group's width
    ax.set_xticks(x, [_wrap(names.get(c, c), chars) for c in cols], fontsize=9)
    ax.set_ylabel("NDCG@10")
    top = max((v for r in table.values() for v in r.values() if v == v), default=1.0)
    ax.set_ylim(0, min(1.0, top * 1.2))
    ax.set_title(title, pad=8 + 14 * ((len(labels) + 2) // 3))
    ax.legend(fontsize=8, ncol=min(len(labels), 3), loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    return fig


def _bar_plot(tasks: list[str], table: dict[str, dict[str, float]], path: Path, title: str,
              run_dir: Path | None = None) -> None:
    save_figure(_bar_figure(tasks, table, title, run_dir), path)


def _merge_plot(merge: dict[str, Any], path: Path) -> bool:
    """One panel per expert: its coefficient in each trial vs the trial's mean dev NDCG@10 (winner starred)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in merge.get("trials") or [] if r.get("ndcg_at_10") is not None]
    comps = sorted({k[2:] for r in rows for k in r if k.startswith("w_")})
    if not rows or not comps:
        return False
    res = merge.get("result") or {}
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 3.6), sharey=True, squeeze=False)
    methods = sorted({str(r.get("method")) for r in rows})
    for ax, c in zip(axes[0], comps):
        for m in methods:
            pts = [(r.get(f"w_{c}"), r["ndcg_at_10"]) for r in rows if str(r.get("method")) == m and r.get(f"w_{c}") is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, alpha=0.75, label=m)
        w = (res.get("weights") or {}).get(c)
        if w is not None and res.get("dev"):
            ax.scatter([w], [res["dev"]["ndcg_at_10"]], marker="*", s=220, color="#d62728", zorder=5, label="winner")
        if res.get("base_dev"):
            ax.axhline(res["base_dev"]["ndcg_at_10"], color="#9e9e9e", ls="--", lw=1, label="base")
        ex = (res.get("experts_dev") or {}).get(c)
        if ex:
            ax.axhline(ex["ndcg_at_10"], color="#1f77b4", ls=":", lw=1, label=f"{c} alone")
        ax.set_xlabel(f"coefficient of {c}")
        ax.set_title(c, fontsize=9)
    axes[0][0].set_ylabel("mean dev NDCG@10")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"merge search: {len(rows)} trials ({merge.get('searcher', '')})", fontsize=10)
    save_figure(fig, path)
    return True


def _throughput_plot(synth: dict[str, Any] | None, experts: dict[str, dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if synth and synth.get("seconds"):
        panels.append(("synthesis", {"generated tokens/s": synth.get("tokens_per_s") or 0.0,
                                     "rows/s (whole stage)": (synth.get("rows") or 0) / synth["seconds"]}))
    if experts:
        panels.append(("training (samples/s)", {n: e.get("samples_per_s") or 0.0 for n, e in experts.items()}))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.4), squeeze=False)
    for ax, (title, vals) in zip(axes[0], panels):
        bars = ax.barh(list(vals), list(vals.values()), color="#1f77b4")
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals.values()], fontsize=8, padding=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens/s, rows/s" if title == "synthesis" else "samples/s", fontsize=8)
        ax.margins(x=0.25)
    save_figure(fig, path)
    return True


def pipeline_table(manifest: dict[str, Any], *, ndcg: bool = True) -> str:
    """Per stage: status, what the rerun rule decided (ran / reused / redone / resumed) and seconds; then
    (``ndcg``) NDCG@10 on the test split per model, when evaluated."""
    rows = [{"stage": n, "status": s.get("status", ""), "action": s.get("action", ""), "seconds": s.get("seconds", "")}
            for n, s in manifest["stages"].items()]
    out = format_table(rows, ["stage", "status", "action", "seconds"], floatfmt="{:.1f}")
    ev = (manifest["stages"].get("evaluate") or {}).get("counts") or {}
    if ndcg and ev.get("ndcg_at_10"):
        table = ev["ndcg_at_10"]
        cols = list(next(iter(table.values())))
        erows = [{"model": label, **scores} for label, scores in table.items()]
        out += f"\n\nNDCG@10 ({ev['split']} split):\n" + format_table(erows, ["model", *cols])
    return out


def dimension_rows(run_dir: Path, labels: list[str]) -> tuple[list[str], list[list[Any]]] | None:
    """Matryoshka: mean NDCG@10 over the tasks per embedding dimension (rows, largest first; "full" on top) and
    model (columns), from the evaluate stage's counts; None when ``eval.dimensions`` was not set."""
    manifest = read_record(run_dir / MANIFEST, kind="run manifest") or {}
    ev = ((manifest.get("stages") or {}).get("evaluate") or {}).get("counts") or {}
    by_dim = ev.get("ndcg_at_10_by_dimension") or {}
    if not by_dim:
        return None
    full = ev.get("ndcg_at_10") or {}
    labels = [lb for lb in labels if lb in full]
    dims = sorted({int(d) for rows in by_dim.values() for d in rows}, reverse=True)
    rows = [["full", *[full[lb].get("mean", float("nan")) for lb in labels]]]
    for d in dims:
        rows.append([d, *[(by_dim.get(lb, {}).get(str(d)) or {}).get("mean", float("nan")) for lb in labels]])
    return ["dimensions", *labels], rows


def rerank_rows(run_dir: Path) -> tuple[list[str], list[list[Any]], dict[str, Any]] | None:
    """The rerank stage's table: one row per task and the mean, NDCG@10 of the retriever alone and with each
    reranker, then seconds per query; None when the stage has not run."""
    manifest = read_record(Path(run_dir) / MANIFEST, kind="run manifest") or {}
    rr = ((manifest.get("stages") or {}).get("rerank") or {}).get("counts") or {}
    table = rr.get("ndcg_at_10") or {}
    if not table.get("retriever"):
        return None
    tasks = [t for t in table["retriever"] if t != "mean"]
    names = area_names(tasks, Path(run_dir))
    labels = list(table)
    header = ["task", f"{rr.get('retriever', 'retriever')} alone", *[f"+ {lb.removeprefix('rerank-')}" for lb in labels[1:]]]
    rows = [[names[t], *[table[lb].get(t, float("nan")) for lb in labels]] for t in tasks]
    rows.append(["mean", *[table[lb].get("mean", float("nan")) for lb in labels]])
    spq = rr.get("seconds_per_query") or {}
    rows.append(["s / query", "", *[(sum(spq.get(lb, {}).values()) / len(spq[lb])) if spq.get(lb) else float("nan")
                                     for lb in labels[1:]]])
    return header, rows, {"retriever": rr.get("retriever"), "top_k": rr.get("top_k"), "split": rr.get("split")}


def _md_table(rows: list[list[Any]], header: list[str]) -> str:
    return format_table([dict(zip(header, r)) for r in rows], header)


def query_synthesis_section(run_dir: Path, stages: dict[str, Any]) -> list[str]:
    """The queries stage's section: per docs: task, yield per kind and per filter, splits, a few examples."""
    counts = ((stages.get("queries") or {}).get("counts") or {}).get("tasks") or {}
    if not counts:
        return []
    md = ["## Query synthesis", "",
          "Queries written by the generator for `docs:` tasks (a corpus without queries), then filtered: lexical "
          "checks and duplicates, round trip (the source document in the base retriever's top k), the reranker's "
          "score when one is given, optionally too-easy ones. Train and dev (and test, unless the source has a real "
          "one) are synthetic queries of disjoint document sets.", ""]
    for spec, r in counts.items():
        rows = [[k, v["generated"], v["kept"], f"{v['kept'] / v['generated']:.0%}" if v["generated"] else "-"]
                for k, v in r["by_kind"].items()]
        rows.append(["all", r["generated"], r["kept"], f"{r['yield']:.0%}"])
        f = r.get("filters") or {}
        s = r["splits"]
        md += [f"### `{spec}`", "",
               f"{r['documents_sampled']} of {r['documents']} documents sampled; "
               f"{r['gen_tokens']} tokens generated" + (f" ({r['tokens_per_s']} tokens/s, all tasks)"
                                                        if r.get("tokens_per_s") else "") + ".", "",
               _md_table(rows, ["kind", "generated", "kept", "yield"]), "",
               "Dropped by filter: " + (", ".join(f"{k} {v}" for k, v in r["drops"].items() if v) or "none") +
               f" (round trip: top {f.get('round_trip_k')}; score filter: "
               + (f"`{f['reranker']}` >= {f['min_score']}" if f.get("reranker") else "skipped, no reranker") +
               f"; too-easy filter: {'on' if f.get('drop_easy') else 'off'}).", "",
               f"Splits (queries): train {s['train']} (synthetic), dev {s['dev']} (synthetic), test {s['test']} "
               f"({r['test']}).", ""]
        ex = r.get("examples") or {}
        if ex.get("kept"):
            md += ["Examples kept: " + "; ".join(f"*{k}*: \"{q}\"" for k, qs in ex["kept"].items() for q in qs[:1]), ""]
        if ex.get("dropped"):
            md += ["Examples dropped: " + "; ".join(f"\"{d['query'][:80]}\" ({d['reason']})" for d in ex["dropped"]), ""]
    md += ["Every generation with its drop reason: `queries/<docs-name>/raw/filtered.parquet`.", ""]
    return md


def teacher_section(stages: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The teacher stage's section: which teacher, how many rows it scored, how fast; the distillation setting."""
    c = (stages.get("teacher") or {}).get("counts") or {}
    if not c:
        return []
    t = cfg.get("teacher") or {}
    what = (f"reranker `{t.get('reranker')}` (its logit per candidate)" if c.get("kind") == "reranker" else
            f"LLM feedback: `{t.get('generator') or (cfg.get('synth') or {}).get('generator')}`'s mean log-probability "
            "of the query given each candidate (vLLM prompt log-probabilities)")
    d = (cfg.get("train") or {}).get("distill")
    return ["## Teacher scores", "",
            f"Teacher: {what}. {c.get('rows_scored')} of {c.get('rows')} rows scored ({c.get('pairs')} (query, "
            f"candidate) pairs, {c.get('pairs_failed')} failed, {c.get('pairs_per_s') or '-'} pairs/s) from "
            f"`{c.get('source')}`. " + (f"Experts distil them: `{d.get('loss')}`, weight {d.get('weight')}, teacher "
                                       f"temperature {d.get('teacher_temperature')}." if d else
                                       "train.distill is off: the experts train on InfoNCE alone."), ""]


def summary_rows(tasks: list[str], table: dict[str, dict[str, float]],
                 run_dir: Path | None = None) -> tuple[list[str], list[list[Any]]]:
    """The headline table: one row per task (area) and the mean; one column per model."""
    names = area_names(tasks, run_dir)
    header = ["task", *table]
    rows = [[names[t], *[table[lb].get(t, float("nan")) for lb in table]] for t in tasks]
    rows.append(["mean", *[table[lb].get("mean", float("nan")) for lb in table]])
    return header, rows


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.md`` and its plots from the run's files; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    manifest = read_record(run_dir / MANIFEST, kind="run manifest")
    if manifest is None:
        what = "is not a readable run manifest" if (run_dir / MANIFEST).exists() else "not found"
        raise FileNotFoundError(f"{run_dir}/{MANIFEST} {what}: is this a run directory of stm-ray run/demo?")
    stages = manifest.get("stages") or {}
    cfg = manifest.get("config") or {}
    plots = run_dir / "report"
    md = [f"# stm-ray run report: `{manifest.get('run_dir', run_dir)}`", "",
          f"Config fingerprint `{manifest.get('fingerprint', '?')}`, created {manifest.get('created', '?')}, updated "
          f"{manifest.get('updated', '?')}. Base model `{(cfg.get('model') or {}).get('name_or_path', '?')}`, tasks "
          + ", ".join(f"`{t}`" for t in (cfg.get("data") or {}).get("tasks", [])) + ".", ""]

    tasks, table, split = ndcg_table(run_dir)
    md += [f"## NDCG@10 on the {split} split", ""]
    if table and tasks:
        header, rows = summary_rows(tasks, table, run_dir)
        md += [_md_table(rows, header), ""]
        base, merged = table.get("base"), table.get("merged")
        experts = {lb: r for lb, r in table.items() if lb.startswith("expert-")}
        if base and merged:
            best = max(experts.items(), key=lambda kv: kv[1].get("mean", float("-inf")), default=(None, None))
            md.append(f"Merged vs base: {merged['mean'] - base['mean']:+.4f} on the mean; better on "
                      f"{sum(merged.get(t, 0) > base.get(t, 0) for t in tasks)} of {len(tasks)} task(s)."
                      + (f" Merged vs the best single expert ({best[0]}): {merged['mean'] - best[1]['mean']:+.4f} on "
                         "the mean." if best[0] else ""))
            md.append("")
        _bar_plot(tasks, table, plots / "ndcg_per_task.png", f"NDCG@10 ({split} split)", run_dir)
        md += ["![NDCG@10 per task](report/ndcg_per_task.png)", ""]
        dims = dimension_rows(run_dir, list(table))
        if dims:
            md += ["### NDCG@10 per embedding dimension (mean over tasks)", "",
                   "Embeddings cut to their first N coordinates and renormalised (Matryoshka); models trained with "
                   "`train.matryoshka_dims` are meant to hold up, others show what truncation costs them.", "",
                   _md_table(dims[1], dims[0]), ""]
        md += ["Per-model results in mteb format: `eval/<model>/<task>.json`.", ""]
    else:
        md += ["Not evaluated yet (run the `evaluate` stage).", ""]

    rr = rerank_rows(run_dir)
    if rr:
        header, rows, info = rr
        md += ["## Reranking", "",
               f"The {info['retriever']} retriever's top {info['top_k']} for each {info['split']} query, re-scored by "
               "each reranker (NDCG@10; seconds per query on this machine).", "", _md_table(rows, header), "",
               "Results in mteb format: `eval/rerank-<name>/<task>.json` (with the retriever's own scores).", ""]

    md += query_synthesis_section(run_dir, stages)
    md += teacher_section(stages, cfg)
    docs = [t for t in (cfg.get("data") or {}).get("tasks", []) if t.startswith("docs:")]
    synthetic_dev = (f" Dev sets of {', '.join(f'`{t}`' for t in docs)} are synthetic queries." if docs else "")

    merge = read_record(run_dir / "merged" / "merge.json", kind="merge result")
    md += ["## Merge search", ""]
    if merge:
        res = merge.get("result") or {}
        w = ", ".join(f"{k} = {v:g}" for k, v in (res.get("weights") or {}).items())
        dens = f", density {res['density']:g}" if res.get("density") is not None and res.get("method") != "linear" else ""
        md.append(f"{len(merge.get('trials') or [])} trials ({merge.get('searcher')}). Winner: **{res.get('method')}**, "
                  f"{w}{dens}; mean dev NDCG@10 {res.get('dev', {}).get('ndcg_at_10', float('nan')):.4f} (base "
                  f"{(res.get('base_dev') or {}).get('ndcg_at_10', float('nan')):.4f}"
                  + "".join(f", {n} {d['ndcg_at_10']:.4f}" for n, d in (res.get("experts_dev") or {}).items()) + ")."
                  + (f" Dropped: {', '.join(res['dropped'])}." if res.get("dropped") else "") + synthetic_dev)
        md.append("")
        if _merge_plot(merge, plots / "merge_trials.png"):
            md += ["![merge trials](report/merge_trials.png)", ""]
        md += ["The merged model is `merged/` (sentence-transformers folder; `merged/merge.json` holds every trial).", ""]
    else:
        md += ["No merge yet.", ""]

    instr = read_record(run_dir / "search" / "instructions.json", kind="search result")
    if instr:
        md += ["## Instruction search", "",
               f"Winner: `{(instr.get('best') or {}).get('instruction') or '(none)'}` — mean dev NDCG@10 "
               f"{(instr.get('dev') or {}).get('ndcg_at_10', float('nan')):.4f} (no instruction: "
               f"{(instr.get('baseline') or {}).get('ndcg_at_10', float('nan')):.4f}), {len(instr.get('trials') or [])} "
               "candidates." + synthetic_dev, ""]

    synth = ((stages.get("synthesize") or {}).get("counts")) or (
        (read_record(run_dir / "synth" / "manifest.json", kind="synthesis manifest") or {}).get("result"))
    train = ((stages.get("train") or {}).get("counts") or {}).get("experts") or {}
    if not train and (run_dir / "experts").is_dir():
        for d in sorted((run_dir / "experts").iterdir()):
            m = read_record(d / "metrics.json", kind="expert metrics")
            if m:
                train[d.name] = m
    md += ["## Throughput", ""]
    if synth:
        by = synth.get("negatives_by_source") or {}
        md.append(f"Synthesis: {synth.get('rows', 0)} (query, positive) rows in {synth.get('seconds', 0):.0f} s; "
                  f"{synth.get('synthetic_generated', 0)} LLM negatives generated, {synth.get('gen_tokens', 0)} tokens "
                  f"at {synth.get('tokens_per_s', 0):.1f} tokens/s; negatives kept by source: "
                  + (", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none")
                  + (f"; dropped by reason: {', '.join(f'{k} {v}' for k, v in synth['drops_by_reason'].items() if v)}"
                     if any((synth.get("drops_by_reason") or {}).values()) else "") + ".")
        md.append("")
    if train:
        md += [_md_table([[n, e.get("rows"), e.get("steps"), e.get("samples_per_s"), e.get("wall_s"),
                           e.get("final_loss")] for n, e in train.items()],
                         ["expert", "rows", "steps", "samples/s", "wall s", "final loss"]), ""]
    if _throughput_plot(synth, train, plots / "throughput.png"):
        md += ["![throughput](report/throughput.png)", ""]

    md += ["## Stages", "", "```", pipeline_table({"stages": stages}, ndcg=False), "```", "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items()) + ".", "",
           "Regenerate with `stm-ray report " + str(manifest.get("run_dir", run_dir)) + "`.", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
