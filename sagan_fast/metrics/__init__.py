"""Sample quality: FID, KID and IS (torchmetrics), and the built-in digits judge.

- :class:`Evaluator` -- real statistics once, then ``evaluator(G) -> {"digits/fid": ..., ...}``;
  ``evaluator.reference`` holds the real data's own values; :func:`format_scores` prints a line.
- :class:`DigitsFeatures` / :func:`load_digits_classifier` -- the small CNN shipped in the package
  (``digits_classifier.pt``, trained by ``python -m sagan_fast.metrics.train_digits_classifier``).
- :class:`InceptionFeatures` -- Inception-v3 (torch-fidelity's) from a local weights file.
- :mod:`.scores` -- the scores on features already extracted.

``python -m sagan_fast.evaluate RUN`` scores a run from the command line.
"""

from .digits import (CLASSIFIER_RESOLUTION, WEIGHTS_PATH, DigitsClassifier, DigitsFeatures, heldout_split,
                     load_digits_classifier, real_digits)
from .evaluator import Evaluator, format_scores
from .inception import InceptionFeatures, MissingDependencyError, load_inception_state_dict
from .scores import (CONFIDENCE_THRESHOLD, class_accuracy, class_coverage, confident_fraction,
                     frechet_distance, inception_score, kernel_distance)

__all__ = ["CLASSIFIER_RESOLUTION", "CONFIDENCE_THRESHOLD", "DigitsClassifier", "DigitsFeatures", "Evaluator",
           "InceptionFeatures", "MissingDependencyError", "WEIGHTS_PATH", "class_accuracy", "class_coverage",
           "confident_fraction", "format_scores", "frechet_distance", "heldout_split", "inception_score",
           "kernel_distance", "load_digits_classifier", "load_inception_state_dict", "real_digits"]
