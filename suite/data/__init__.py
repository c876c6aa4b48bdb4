"""Data sources: bundled samples, CIFAR-10 batches, ImageFolder trees and COCO detection data.

``load(source, ...)`` returns a ``Batch`` of images in [0, 1] with labels or boxes.
"""

from suite.data.batch import Batch  # noqa: F401
from suite.data.load import list_ids, load  # noqa: F401
from suite.data.samples import DETECTION_SAMPLES, SAMPLE_NAMES  # noqa: F401
