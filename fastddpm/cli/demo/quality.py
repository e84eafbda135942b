"""Sample-quality figures for the demo, computed against held-out real digits.

Two views, both fitted on the real training digits only, so they are fixed before any sample is
scored:
- a logistic-regression digit classifier: its mean top-class probability on a set of images
  says how much they look like some digit (real held-out digits score about 0.95);
- the kernel MMD^2 (RBF kernel, unbiased estimate) between a set of images and the held-out
  digits in a fixed PCA feature space: 0 means indistinguishable from real data, and the same
  figure for real training digits versus held-out digits gives the floor to compare with.
"""
import numpy as np

PCA_DIMS = 16


class QualityJudge:
    def __init__(self, train: np.ndarray, train_labels: np.ndarray, held_out: np.ndarray,
                 held_out_labels: np.ndarray):
        """``train``/``held_out``: [N, 64] float images in [-1, 1]; labels 0..9."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        self.held_out = held_out
        self.classifier = LogisticRegression(max_iter=2000).fit(train, train_labels)
        self.held_out_accuracy = float(self.classifier.score(held_out, held_out_labels))
        self.pca = PCA(PCA_DIMS, random_state=0).fit(train)
        self._held_feats = self.pca.transform(held_out)
        # Bandwidth from the median pairwise distance of the training features (the usual
        # heuristic), computed once so every set is scored with the same kernel.
        feats = self.pca.transform(train)
        d2 = _sq_dists(feats, feats)
        self.gamma = 1.0 / float(np.median(d2[np.triu_indices_from(d2, k=1)]))

    def confidence(self, images: np.ndarray) -> float:
        return float(self.classifier.predict_proba(images).max(axis=1).mean())

    def class_counts(self, images: np.ndarray) -> list:
        return np.bincount(self.classifier.predict(images), minlength=10).tolist()

    def mmd2(self, images: np.ndarray) -> float:
        """Unbiased RBF-kernel MMD^2 between ``images`` and the held-out digits."""
        x = self.pca.transform(images)
        y = self._held_feats
        kxx = np.exp(-self.gamma * _sq_dists(x, x))
        kyy = np.exp(-self.gamma * _sq_dists(y, y))
        kxy = np.exp(-self.gamma * _sq_dists(x, y))
        m, n = len(x), len(y)
        return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                     + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                     - 2.0 * kxy.mean())

    def score(self, images: np.ndarray) -> dict:
        """All figures for a set of [N, 64] images (clipped to the data range first)."""
        images = np.clip(images, -1.0, 1.0)
        return {"classifier_confidence": self.confidence(images),
                "mmd2_to_held_out": self.mmd2(images),
                "predicted_class_counts": self.class_counts(images)}


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


NOTE = ("classifier_confidence: mean top-class probability of a logistic regression fitted on the training "
        "digits (higher is better); mmd2_to_held_out: unbiased RBF-kernel MMD^2 to the held-out digits in a "
        "16-d PCA space (lower is better); real_train_digits is the floor real data reaches. The untrained "
        "model's output layer starts at zero, so its samples are the reverse process with eps_theta = 0")


def quality_figures(judge: QualityJudge, trained: np.ndarray, untrained: np.ndarray, real: np.ndarray) -> dict:
    """summary.json's "quality": the trained and untrained models' samples and real training
    digits (each [N, 1, 8, 8]), scored by the same judge."""
    def flat(x):
        return x.reshape(len(x), -1)

    return {"trained": judge.score(flat(trained)), "untrained": judge.score(flat(untrained)),
            "real_train_digits": judge.score(flat(real)),
            "held_out_classifier_accuracy": judge.held_out_accuracy, "note": NOTE}
