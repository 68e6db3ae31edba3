"""Explanations: where in the image the model looked for a class, as a small heatmap in [0, 1].

Two methods (Captum), chosen by the model's input size from what was measured here (1 thread,
OMP_WAIT_POLICY=PASSIVE as in the workers):
- Integrated Gradients, IG_STEPS steps (that many forward and backward passes) from the image's
  own background (`background`), |attribution| summed over channels and averaged down to
  GRID x GRID: for small inputs (crop <= IG_MAX_CROP). The book's Net on 32x32 digits, trained
  with the digits augmentation (both polarities): on 40 held-out digits the heatmap's mean on the
  strokes was above its mean on the background for 40 of 40 (median ratio 5.85), 3.9 ms an image
  (measured in-process, 1 thread). With an all-zero baseline the
  same model gave 4 of 10; Grad-CAM's 16x16 map lay mostly on the background (median ratio 0.10,
  measured on the earlier unaugmented model).
- Grad-CAM (LayerGradCam) on the last convolution, ReLU'd, at that layer's grid: for photo-size
  inputs. resnet18 at 224: 106 ms for 7x7, where Integrated Gradients takes 2.6 s (23-25x in
  two runs at different loads).
Both run on the eager model (loaded on the first explanation), whatever backend serves inference.
"""

import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

GRID = 14  # Integrated Gradients' heatmap side
IG_STEPS = 16  # bounded cost: 16 forward+backward passes per image
IG_MAX_CROP = 64  # above this input side, Integrated Gradients costs seconds on a CPU: Grad-CAM


def last_conv(model: torch.nn.Module):
    convs = [module for module in model.modules() if isinstance(module, torch.nn.Conv2d)]
    return convs[-1] if convs else None


def background(images: torch.Tensor) -> torch.Tensor:
    """Integrated Gradients' baseline: each image's own background, the per-channel median of its
    border pixels, everywhere (Tensor[N, 3, H, W]). An all-zero baseline is the training mean in
    normalised units, which for a model trained on both polarities lies between ink and paper, so
    the background would count as much as the strokes."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    return border.median(dim=-1).values[..., None, None].expand_as(images).contiguous()


class Explainer:
    """Heatmaps [h, w] float32 in [0, 1] for a batch of preprocessed images and their target classes."""

    def __init__(self, model: torch.nn.Module, crop: int, method: str = None):
        """`method`: "gradcam" or "integrated_gradients"; by default chosen from the input side `crop`
        (see above), Integrated Gradients for a model without a convolution."""
        from captum.attr import IntegratedGradients, LayerGradCam  # imported by the worker anyway

        self.model = model.eval()
        layer = last_conv(model)
        big = crop > IG_MAX_CROP and layer is not None
        self.method = method or ("gradcam" if big else "integrated_gradients")
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
            attributions = self.attribution.attribute(images, baselines=background(images), target=target,
                                                      n_steps=IG_STEPS)
            maps = F.adaptive_avg_pool2d(attributions.abs().sum(dim=1, keepdim=True), GRID)[:, 0]
        maps = maps.detach().float().clamp(min=0)
        peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)
        return maps / peak[:, None, None], time.perf_counter() - start
