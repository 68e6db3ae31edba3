"""Explanations: where in the image the model looked for a class, as a small heatmap.

Grad-CAM (Captum's LayerGradCam) on the model's last convolution: one forward and one backward per
image, a heatmap at that layer's grid (the book's Net on 32x32 digits: 16x16; resnet18 at 224: 7x7),
ReLU'd and scaled to [0, 1]. Integrated Gradients (Captum, IG_STEPS steps, i.e. that many forward
and backward passes) is the fallback for a model without a convolution, averaged down to GRID x GRID.
Both run on the eager model (loaded on the first explanation), whatever backend serves inference.
"""

import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

GRID = 14  # Integrated Gradients' heatmap side
IG_STEPS = 16  # bounded cost: 16 forward+backward passes per image


def last_conv(model: torch.nn.Module):
    convs = [module for module in model.modules() if isinstance(module, torch.nn.Conv2d)]
    return convs[-1] if convs else None


class Explainer:
    """Heatmaps [h, w] float32 in [0, 1] for a batch of preprocessed images and their target classes."""

    def __init__(self, model: torch.nn.Module, method: str = None):
        """`method`: "gradcam" or "integrated_gradients"; by default Grad-CAM where the model has a
        convolution (measured cheaper and sharper here: see the README's Explanations)."""
        from captum.attr import IntegratedGradients, LayerGradCam  # imported by the worker anyway

        self.model = model.eval()
        layer = last_conv(model)
        self.method = method or ("gradcam" if layer is not None else "integrated_gradients")
        if self.method == "gradcam":
            self.attribution = LayerGradCam(model, layer)
        else:
            self.attribution = IntegratedGradients(model)

    def __call__(self, images: torch.Tensor, targets: list) -> tuple:
        """images Tensor[N, 3, H, W], targets [N] class indices -> (Tensor[N, h, w] in [0, 1], seconds)."""
        start = time.perf_counter()
        target = torch.tensor(targets)
        if self.method == "gradcam":
            maps = self.attribution.attribute(images, target=target, relu_attributions=True)[:, 0]
        else:
            attributions = self.attribution.attribute(images, target=target, n_steps=IG_STEPS)
            maps = F.adaptive_avg_pool2d(attributions.abs().sum(dim=1, keepdim=True), GRID)[:, 0]
        maps = maps.detach().float().clamp(min=0)
        peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)
        return maps / peak[:, None, None], time.perf_counter() - start
