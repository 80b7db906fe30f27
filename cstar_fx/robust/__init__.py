"""Adversarial robustness: attacks, adversarial losses, fine-tuning, CSTAR's joint training, evaluation.

Example:
    >>> from cstar_fx.robust import pgd, adversarial_loss, finetune, cstar, evaluate, TrainConfig
"""

from .admm import Admm, AdmmRecord, auto_rho
from .attacks import fgsm, pgd, pgd_attack
from .config import RECOMMENDED, AdmmConfig, AttackConfig, JointConfig, LossConfig, Recipe, TrainConfig
from .cstar import calibration_batches, compress, cstar, decompose_finetune
from .distributed import World, init_from_env, is_main_process, process_group
from .evaluate import MissingExtraError, RobustResult, SanityReport, autoattack, evaluate
from .finetune import RunDirError, TrainHistory, TrainHook, finetune, load_checkpoint, recalibrate_bn
from .losses import LossOutput, adversarial_loss, adversarial_step
from .sensitivity import layer_sensitivity

__all__ = [
    "pgd", "pgd_attack", "fgsm",
    "adversarial_loss", "adversarial_step", "LossOutput",
    "AttackConfig", "LossConfig", "TrainConfig", "AdmmConfig", "JointConfig", "Recipe", "RECOMMENDED",
    "finetune", "TrainHook", "TrainHistory", "RunDirError", "load_checkpoint", "recalibrate_bn",
    "Admm", "AdmmRecord", "auto_rho",
    "compress", "cstar", "decompose_finetune", "calibration_batches", "layer_sensitivity",
    "evaluate", "autoattack", "RobustResult", "SanityReport", "MissingExtraError",
    "init_from_env", "process_group", "is_main_process", "World",
]
