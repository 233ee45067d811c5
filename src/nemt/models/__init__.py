"""Models: the classifier zoo, cards and checkpoints, training."""
from nemt.models.card import ModelCard
from nemt.models.classifier import Classifier, load_model
from nemt.models.training import TrainConfig, evaluate, load_splits, train_classifier
from nemt.models.zoo import ARCHITECTURES, build_model

__all__ = ["ARCHITECTURES", "Classifier", "ModelCard", "TrainConfig", "build_model", "evaluate",
           "load_model", "load_splits", "train_classifier"]
