"""A documented compatibility shim for mergekit 0.1.5: architecture definitions whose optional weights have aliases.

The bug: ``MergePlanner.plan_tensor`` (``mergekit/plan.py``) checks an *optional* weight with
``[w_in.name] + (w_in.aliases or [])``, but ``WeightInfo.aliases`` is a tuple, so any architecture definition with an
optional, aliased weight fails with ``TypeError: can only concatenate list (not "tuple") to list`` for every merge
method. ``bert.json`` is one of them (``embeddings.position_ids``, optional, alias ``bert.embeddings.position_ids``):
no BERT / MiniLM checkpoint merges at all.

The fix goes through mergekit's own mechanism, its registry of JSON architecture definitions
(``mergekit.architecture.json_definitions.NAME_TO_ARCH``): each affected definition is replaced by a copy whose
optional weights carry no aliases. Nothing else changes. The only loss: an optional weight stored under an alias name
(e.g. ``bert.embeddings.position_ids``, a buffer transformers rebuilds anyway) is skipped as absent instead of merged.
The shim is applied only while mergekit still has the bug (detected from its source), so a fixed mergekit is used as
it is. ``tests/test_merge.py`` shows the failure without the shim and the merge with it.
"""

from __future__ import annotations

import inspect
import logging
import threading

log = logging.getLogger(__name__)

BUG_SNIPPET = "[w_in.name] + (w_in.aliases or [])"
_lock = threading.Lock()
_patched: list[str] | None = None


def has_alias_bug() -> bool:
    """True when mergekit's planner still concatenates a list with the ``aliases`` tuple."""
    from mergekit.plan import MergePlanner

    return BUG_SNIPPET in inspect.getsource(MergePlanner.plan_tensor)


def _fix_weights(weights):
    fixed = [w.model_copy(update={"aliases": None}) if w.optional and w.aliases else w for w in weights]
    return fixed, any(a is not b for a, b in zip(fixed, weights))


def without_optional_aliases(arch):
    """A copy of a JSON architecture definition whose optional weights have no aliases; None if it has none."""
    from mergekit.architecture.json_definitions import JsonModuleArchitecture

    changed = False
    modules = {}
    for key, mod in arch.modules.items():
        a = mod.architecture
        if isinstance(a, JsonModuleArchitecture):
            d = a.definition
            pre, c1 = _fix_weights(d.pre_weights)
            layer, c2 = _fix_weights(d.layer_templates.weights)
            post, c3 = _fix_weights(d.post_weights)
            if c1 or c2 or c3:
                changed = True
                d = d.model_copy(update={"pre_weights": pre, "post_weights": post,
                                         "layer_templates": d.layer_templates.model_copy(update={"weights": layer})})
                mod = mod.model_copy(update={"architecture": JsonModuleArchitecture(definition=d)})
        modules[key] = mod
    return arch.model_copy(update={"modules": modules}) if changed else None


def install() -> list[str]:
    """Apply the shim once per process (idempotent); returns the architecture names it replaced."""
    global _patched
    with _lock:
        if _patched is not None:
            return _patched
        _patched = []
        if not has_alias_bug():
            return _patched
        from mergekit.architecture import json_definitions as jd

        for i, arch in enumerate(jd.JSON_ARCHITECTURES):
            fixed = without_optional_aliases(arch)
            if fixed is None:
                continue
            jd.JSON_ARCHITECTURES[i] = fixed
            for name in arch.architectures:
                jd.NAME_TO_ARCH[name] = [fixed if a is arch else a for a in jd.NAME_TO_ARCH.get(name, [])]
                _patched.append(name)
        log.debug("mergekit alias shim applied to %s", _patched)
        return _patched
