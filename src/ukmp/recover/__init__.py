"""Recovery after pruning: weight-recalling LoRA and progressive distillation (UKMP §3)."""

from ukmp.recover.losses import kl_teacher_student, lpd_loss, normalized_mse
from ukmp.recover.schedule import FeatureTaps, ScheduleConfig, Stage, build_schedule
from ukmp.recover.train import TrainConfig, TrainResult, train_lpd
from ukmp.recover.wr_lora import (
    WRLoRALinear,
    adapter_state_dict,
    inject_wr_lora_,
    load_adapter_,
    load_adapter_state_dict_,
    merge_wr_lora_,
    save_adapter,
)

__all__ = [
    "FeatureTaps", "ScheduleConfig", "Stage", "TrainConfig", "TrainResult", "WRLoRALinear", "adapter_state_dict",
    "build_schedule", "inject_wr_lora_", "kl_teacher_student", "load_adapter_", "load_adapter_state_dict_",
    "lpd_loss", "merge_wr_lora_", "normalized_mse", "save_adapter", "train_lpd",
]
