"""The settings of one ZEDA run (typed; unknown keys and out-of-range values are one-line errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import set_apart_from, settings_error
from ..units import SEED_MAX


class ZedaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_zero: int | None = Field(None, gt=0, description="zero experts per router (default: top-k - 1)")
    topk_mode: Literal["same", "plus-one"] = "same"
    # how the student weighs its slots (zero.layout, zero_experts_weights): "original" keeps the real
    # experts' original weights (zero experts only drop the lowest slots), "renormalized" lets a zero
    # slot's weight shrink the real ones (what stock loaders compute). Measured on the wide demo model:
    # original 47.9% skip at KL 0.035, renormalized 40.2% at KL 0.044 (RESULTS.md, session 8).
    zero_weights: Literal["original", "renormalized"] = "original"
    # what a zero row's logit is (zero.layout, zero_experts_logits): "relative" adds the token's best real
    # logit, so the zero rows start from (and can learn beyond) the threshold rule; "linear" is a plain row
    zero_logits: Literal["relative", "linear"] = "relative"
    target_skip: float = 0.5
    data: str = "builtin:stdlib"
    prompts: int = Field(256, gt=0)  # 64 -> 256: lower KL at a higher skip on both demo models (RESULTS.md, session 12)
    prompt_len: int = Field(32, gt=1)
    gen_len: int = Field(64, gt=0)
    stage1_steps: int = Field(120, ge=0)
    stage2_steps: int = Field(60, ge=0)
    lr: float = Field(5e-3, gt=0)
    batch: int = Field(8, gt=0)
    balance_weight: float = Field(1.0, ge=0)
    balance: Literal["slots", "mass"] = "slots"
    # where the balancing loss steers the zero share: each layer's, or only the mean over layers (losses.py)
    balance_scope: Literal["layer", "model"] = "layer"
    route_weight: float = Field(1.0, ge=0)
    trainable: Literal["routers", "zero-rows", "routers+norms", "lora"] = "routers"
    # --trainable lora: the routers, plus a rank-r adapter per routed expert (gate/up and down; peft)
    lora_rank: int = Field(8, gt=0)
    lora_lr: float = Field(1e-3, gt=0, description="learning rate of the LoRA adapters (the routers keep lr)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of both stages' generations")
    device: str = "cpu"
    # across torchrun ranks: "ddp" replicates the model on every rank, "fsdp" shards it (FSDP2)
    shard: Literal["ddp", "fsdp"] = "ddp"
    # forwards under bf16 autocast (weights and optimizer stay fp32; routers compute in fp32): "auto" = on
    # a GPU, fp32 on a CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    layout: Literal["native", "stock"] = "native"
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(20, gt=0, description="steps between resumable training checkpoints")

    @model_validator(mode="after")
    def _steps(self):
        if self.stage1_steps + self.stage2_steps == 0:
            raise ValueError("stage1_steps and stage2_steps are both 0: nothing would be trained")
        unused = set_apart_from(self, ("lora_rank", "lora_lr"), "trainable lora")
        if unused and self.trainable != "lora":  # set, and it would be silently ignored
            raise ValueError(f"{unused} (trainable is {self.trainable})")
        return self

    @field_validator("target_skip")
    @classmethod
    def _skip(cls, v):
        if not 0.0 < v < 1.0:
            raise ValueError(f"target_skip {v} must lie in (0, 1)")
        return v


def build_zeda_config(spelling: Literal["recipe", "cli"] = "recipe", **kw) -> ZedaConfig:
    """ZedaConfig from user values; a bad value is one UserError line in the recipe's keys or the CLI's options."""
    try:
        return ZedaConfig(**kw)
    except ValidationError as e:
        raise settings_error(e, ZedaConfig.model_fields, "zeda setting", {} if spelling == "cli" else None) from None
