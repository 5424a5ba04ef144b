"""Train: InfoNCE loss, same-task batching, the Ray Train worker loop (DDP or DeepSpeed), experts in parallel."""

from stm_ray.train.batching import TrainRows, build_batch, plan_batches, worker_slice
from stm_ray.train.experts import ExpertResult, summary_table, train_expert, train_experts
from stm_ray.train.loss import contrastive_step_loss, info_nce

__all__ = ["ExpertResult", "TrainRows", "build_batch", "contrastive_step_loss", "info_nce", "plan_batches",
           "summary_table", "train_expert", "train_experts", "worker_slice"]
