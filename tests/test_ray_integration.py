from __future__ import annotations

import numpy as np
import pytest

from stm_ray.data import load_task
from stm_ray.eval.ray_encode import ray_encode
from stm_ray.modeling import Embedder

pytestmark = pytest.mark.integration


def test_ray_data_encoding_equals_local(ray_local, tiny_bert_dir, tiny_beir):
    task = load_task(f"beir:{tiny_beir}")
    local = Embedder.from_pretrained(tiny_bert_dir).encode(task.corpus.column("text").to_pylist())
    distributed = ray_encode(task.corpus, {"name_or_path": tiny_bert_dir}, batch_size=3, concurrency=2, num_cpus=0.5)
    np.testing.assert_allclose(distributed, local, atol=1e-5)
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1")


def test_ray_encode_checks_columns(ray_local, tiny_beir):
    task = load_task(f"beir:{tiny_beir}")
    with pytest.raises(ValueError, match="needs a 'text' column"):
        ray_encode(task.corpus.select(["_id"]), {"name_or_path": "minilm"})


def test_local_ray_workers_address_their_cluster_and_mute_the_cleaner(ray_local):
    """Without a dashboard, Ray Train's PlacementGroupCleaner would warn every few seconds (or die with a traceback
    when another Ray runs on the machine): the local Ray's workers point the State API at their own cluster and mute
    that logger. The demo test checks its console has no such lines."""
    import logging
    import os

    from stm_ray.ray_setup import _NOISY_RAY_LOGGERS

    @ray_local.remote(num_cpus=0)
    def probe():
        return [logging.getLogger(n).level for n in _NOISY_RAY_LOGGERS], os.environ.get("RAY_ADDRESS")

    levels, address = ray_local.get(probe.remote())
    assert levels == [logging.ERROR] * len(_NOISY_RAY_LOGGERS)
    assert address == ray_local.get_runtime_context().gcs_address
