"""Image metrics of the benchmark: SSIM / PSNR against a reference batch, class accuracy and Fréchet distance by
a digit classifier fitted in seconds, within-class diversity. Images are [N, 1, H, W] in display space [0, 1]."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 7
SSIM_SIGMA = 1.5


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; Gaussian window, valid region, K1 0.01, K2 0.03), shape [N]."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two equal [N, C, H, W] batches, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.double()
    b = b.double()
    channels = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(window, sigma).to(a.device).expand(channels, 1, window, window)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    def blur(x):
        return F.conv2d(x, w, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1).float()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, cap: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB, shape [N]; identical images read `cap`."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    out = 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-300))
    return out.clamp(max=cap).float()


def psnr_of_set(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB of the mean squared error over the whole set (identical images do not dominate the mean the
    way a capped per-image PSNR would); inf when the sets are identical."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ([N, D] each)."""
    from scipy import linalg
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1 = np.cov(f1, rowvar=False)
    s2 = np.cov(f2, rowvar=False)
    with warnings.catch_warnings():  # dead judge units make the covariances singular; handled below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    return max(value, 0.0)


def within_class_diversity(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance between images of the same class, averaged over classes."""
    flat = images.double().flatten(1)
    values = []
    for c in labels.unique().tolist():
        group = flat[labels == c]
        if group.shape[0] < 2:
            continue
        d = torch.cdist(group, group)
        n = group.shape[0]
        values.append(float(d.sum() / (n * (n - 1))))
    return float(np.mean(values)) if values else float("nan")


class DigitClassifier:
    """A small MLP (scikit-learn) on the 8x8 digits, fitted in seconds. Its hidden layer gives the features of
    the Fréchet distance. Inputs are display-space images [N, 1, 8, 8] in [0, 1]."""

    def __init__(self, seed: int = 0, hidden: int = 64, holdout: float = 0.25):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
        data = load_digits()
        x = data.data.astype(np.float64) / 16.0
        y = data.target
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=holdout, random_state=seed, stratify=y)
        self.clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=600, random_state=seed)
        self.clf.fit(x_tr, y_tr)
        self.heldout_accuracy = float(self.clf.score(x_te, y_te))
        self.real = x
        self.real_labels = y
        self.heldout = x_te
        self.train = x_tr

    @staticmethod
    def _flat(images: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
        return np.asarray(images, dtype=np.float64).reshape(len(images), -1).clip(0.0, 1.0)

    def predict(self, images) -> np.ndarray:
        return self.clf.predict(self._flat(images))

    def accuracy(self, images, labels) -> float:
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        return float((self.predict(images) == labels).mean())

    def features(self, images) -> np.ndarray:
        """Hidden-layer (ReLU) activations, [N, hidden]."""
        x = self._flat(images)
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def fd_to_real(self, images) -> float:
        """Fréchet distance of the images' features to those of all real digits."""
        return frechet_distance(self.features(images), self.features(self.real))

    def real_floor(self) -> float:
        """Fréchet distance of the held-out real digits to all real digits (a floor for samples)."""
        return frechet_distance(self.features(self.heldout), self.features(self.real))
