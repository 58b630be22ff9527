"""Scores of samples: FID, precision and recall, classifier scores (metrics), against cached reference
statistics of a data set (scoring), with the digit classifier or Inception-v3 features (features), and the
pixel scores of image-conditioned models (conditioned). evaluate.py is its command line."""
from evaluation.conditioned import evaluate_conditioned
from evaluation.features import build_extractor, train_classifier
from evaluation.scoring import reference_stats, score_images

__all__ = ["build_extractor", "evaluate_conditioned", "reference_stats", "score_images", "train_classifier"]
