"""The stages of a run, each a unit: a small frozen spec (the only config it reads), typed inputs (the results of
the stages before it) and a typed result.

    data -> sft -> reward_model -> augment -> reference -> preference -> evaluate

Cached stages (sft, reward_model=train, augment, reference, the SFT policy's evaluation) derive their key with
`cache.stage_entry` from exactly what their build function can see: the spec, the keys of the upstream results
(an `Examples` key is a fingerprint of the data's content) and `Env.numeric()` (device type, precision). A build
function is a closure over those arguments alone and never sees the Hydra config, so it cannot read a setting
its key does not cover. Settings that cannot change a result (logging, checkpoint cadence, the distributed
strategy) travel in `Env.runtime` and are not keyed.

Modules: `specs` (values, specs, results), `env` (the Env and the cached-stage protocol), `sft_reference`,
`annotation` (trained reward models, augmentation), `training` (preference), `evaluation`.
"""
from hps_exp.stages.annotation import augmented, trained_reward_model
from hps_exp.stages.env import Env, Runtime
from hps_exp.stages.evaluation import evaluate_policy, evaluate_sft
from hps_exp.stages.sft_reference import SFTBatch, reference, sft
from hps_exp.stages.specs import (
    AugmentResult,
    AugmentSpec,
    EvalResult,
    EvalSet,
    EvalSpec,
    Examples,
    MarginReward,
    ModelSpec,
    PolicyResult,
    PreferenceSpec,
    ReferenceSpec,
    RefLogps,
    RewardModelSpec,
    Scorer,
    SFTResult,
    SFTSpec,
)
from hps_exp.stages.training import PolicyDraws, preference

__all__ = ["AugmentResult", "AugmentSpec", "Env", "EvalResult", "EvalSet", "EvalSpec", "Examples", "MarginReward",
           "ModelSpec", "PolicyDraws", "PolicyResult", "PreferenceSpec", "ReferenceSpec", "RefLogps",
           "RewardModelSpec", "Runtime", "SFTBatch", "SFTResult", "SFTSpec", "Scorer", "augmented", "evaluate_policy",
           "evaluate_sft", "preference", "reference", "sft", "trained_reward_model"]
