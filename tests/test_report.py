"""The report's plots read well: rendered for real, no two labels on top of each other."""

from __future__ import annotations

import itertools

import pytest


def _texts_overlap(fig) -> list[tuple[str, str]]:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in ax.get_xticklabels() if t.get_text()]
    legend = ax.get_legend()
    if legend is not None:
        boxes.append(("<legend>", legend.get_window_extent(r)))
    boxes.append(("<title>", ax.title.get_window_extent(r)))
    boxes += [(f"<bar label {t.get_text()}>", t.get_window_extent(r)) for t in ax.texts]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2)
            if ba.width and bb.width and ba.overlaps(bb)]


@pytest.mark.parametrize("n_tasks,n_models", [(2, 4), (5, 6), (1, 2)])
def test_ndcg_plot_labels_do_not_overlap(n_tasks, n_models):
    from stm_ray.report import _bar_figure

    tasks = ["icd10:1,2,3,4,5,6", "docs:icd10:9,10,11,12", "beir:/data/scifact", "docs:beir:/data/nfcorpus",
             "icd10:13,14,15,16,17,18,19"][:n_tasks]
    models = ["base", *[f"expert-docs-icd10-9-10-11-12-{i}" for i in range(n_models - 2)], "merged"]
    table = {m: {**{t: 0.4 + 0.01 * i for t in tasks}, "mean": 0.45} for i, m in enumerate(models)}
    fig = _bar_figure(tasks, table, "NDCG@10 (test split)")
    fig.tight_layout()
    assert _texts_overlap(fig) == []
    # and inside the figure: nothing cut off at the edges
    r = fig.canvas.get_renderer()
    W, H = fig.canvas.get_width_height()
    for t in fig.axes[0].get_xticklabels():
        b = t.get_window_extent(r)
        assert b.x0 >= 0 and b.x1 <= W and b.y0 >= 0, t.get_text()


def test_the_old_layout_would_have_failed():
    """The check finds overlapping labels (long task names unwrapped on a narrow figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([0, 1, 2], [0.4, 0.5, 0.45])
    ax.set_xticks([0, 1, 2], ["ICD-10 ch. 1,2,3,4,5,6", "ICD-10 ch. 9,10,11,12 (synthetic train, real test)", "mean"])
    assert _texts_overlap(fig)
    plt.close(fig)
