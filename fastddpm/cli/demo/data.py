"""The demo's data: scikit-learn's 8x8 digits (shipped inside scikit-learn, no download), with a
fixed held-out split."""
import numpy as np

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0  # the held-out split is fixed, so quality figures compare across --seed values


def load_digits_split():
    """scikit-learn's 8x8 digits in [-1, 1] as ([N,1,8,8] train, labels, held-out, labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values are 0..16
    order = np.random.RandomState(SPLIT_SEED).permutation(len(images))
    n_held = int(len(images) * HELD_OUT_FRACTION)
    held, train = order[:n_held], order[n_held:]
    return images[train], digits.target[train], images[held], digits.target[held]


def real_reference(train_x: np.ndarray, n: int) -> np.ndarray:
    """``n`` fixed training digits: what real data scores against the held-out set."""
    return train_x[np.random.RandomState(SPLIT_SEED).permutation(len(train_x))[:n]]
