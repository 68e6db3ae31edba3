"""The real photographs every tool and test uses: scikit-learn ships two (640x427 JPEGs, CC BY)."""

from pathlib import Path

import sklearn.datasets

PHOTOS = sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
