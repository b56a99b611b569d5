"""The instance grounding head: model, loss, features, training, and its labeller."""
from engine.grounding.features import Featurizer, head_inputs
from engine.grounding.labeller import GroundingHeadLabeller, TeacherPlusHeadLabeller  # registers the labellers
from engine.grounding.loss import LossConfig, grounding_loss, hungarian_match
from engine.grounding.model import GroundingConfig, GroundingHead, ema_update, make_teacher, predictions
from engine.grounding.train import (GroundingJob, GroundingTrainConfig, load_grounding_head, save_grounding_head,
                                    train_grounding, train_local)

__all__ = ["Featurizer", "GroundingHeadLabeller", "TeacherPlusHeadLabeller", "head_inputs", "LossConfig", "grounding_loss", "hungarian_match", "GroundingConfig",
           "GroundingHead", "ema_update", "make_teacher", "predictions", "GroundingJob", "GroundingTrainConfig",
           "load_grounding_head", "save_grounding_head", "train_grounding", "train_local"]
