"""Classifier guidance (Dhariwal & Nichol 2021, §4.2, Algorithm 2) in the denoising loop, for any prediction type.

A noise-aware classifier p_φ(y | x_t) (latentdiff/models/classifier.py) steers sampling towards a class y: the
noise prediction, which is −√(1 − ᾱ_t) times the score ∇ log p(x_t), becomes that of p(x_t) p_φ(y | x_t)^s.
The shift is made in the noise-prediction form and carried to whatever the model predicts, at fixed x_t:

| code name         | symbol                                   | equation                                              |
|-------------------|------------------------------------------|-------------------------------------------------------|
| ``gradient``      | g = ∇_{x_t} log p_φ(y | x_t)             | autograd through the classifier, at the model input x_t |
| ``scale``         | s                                        | ``classifier_guidance_scale``                          |
| ``alpha_prod``    | ᾱ_t                                      | of the model input's timestep (interpolated if fractional) |
| epsilon           | ε̂' = ε̂ − s √(1 − ᾱ_t) g                   | Algorithm 2 (D&N eq. 14 with the scale s)              |
| v_prediction      | v̂' = v̂ − s √(1 − ᾱ_t)/√ᾱ_t · g            | v = (ε − √(1 − ᾱ_t) x_t)/√ᾱ_t at fixed x_t              |
| sample            | x̂₀' = x̂₀ + s (1 − ᾱ_t)/√ᾱ_t · g           | x̂₀ = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t at fixed x_t             |

All three give the sampler the same ε̂' and x̂₀'. At ᾱ_t = 0 (the first step of a zero-SNR schedule) x_t holds no
information about y, so ∇ log p(y | x_t) is 0 for the true posterior and the step is left unguided (v and x̂₀ would
divide by √ᾱ_t = 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_class_labels(
    classifier,
    class_labels: Mapping[str, int | Sequence[int] | Tensor],
    batch_size: int,
    device: torch.device,
) -> dict[str, Tensor]:
    """The target labels as {attribute: (B,) long tensor}, or a ValueError naming what does not match.

    Args:
        classifier: has ``config.attributes``, the (name, class count) pairs it predicts.
        class_labels: one entry per attribute: one class index for every image, or a list of B.
        batch_size: B, the number of images.
    """
    attributes = dict(classifier.config.attributes)
    if not isinstance(class_labels, Mapping) or set(class_labels) != set(attributes):
        given = sorted(class_labels) if isinstance(class_labels, Mapping) else type(class_labels).__name__
        raise ValueError(
            f"class_labels has {given} but the classifier predicts {sorted(attributes)}; pass one class index "
            f"(or a list of {batch_size}) per attribute, e.g. {{{', '.join(repr(a) + ': 0' for a in attributes)}}}."
        )
    labels = {}
    for name, count in attributes.items():
        value = torch.as_tensor(class_labels[name], dtype=torch.long, device=device).reshape(-1)
        if value.numel() == 1:
            value = value.expand(batch_size)
        if value.numel() != batch_size:
            raise ValueError(
                f"class_labels[{name!r}] has {value.numel()} entries for {batch_size} images; pass one index or "
                f"{batch_size}."
            )
        if int(value.min()) < 0 or int(value.max()) >= count:
            raise ValueError(
                f"class_labels[{name!r}] holds {value.tolist()}, outside the classifier's {count} classes "
                f"0 … {count - 1}."
            )
        labels[name] = value
    return labels


def log_prob_gradient(
    classifier, sample: Tensor, timestep: Tensor | float, labels: dict[str, Tensor]
) -> Tensor:
    """g = ∇_{x_t} log p_φ(y | x_t), shape and dtype of ``sample`` (each image's own gradient: the sum over the
    batch separates, as every image's log-probability depends on its own x_t only)."""
    with torch.enable_grad():
        x = sample.detach().to(next(classifier.parameters()).dtype).requires_grad_(True)
        log_prob = classifier.log_prob(x, timestep, labels).sum()
        (gradient,) = torch.autograd.grad(log_prob, x)
    return gradient.to(sample.dtype)


def alpha_prod_at(alphas_cumprod: Tensor, timestep: Tensor | float) -> float:
    """ᾱ at a (possibly fractional) timestep, linear between the trained integers."""
    table = alphas_cumprod.detach().double().cpu().numpy()
    return float(np.interp(float(timestep), np.arange(len(table)), table))


def guide_model_output(
    model_output: Tensor, gradient: Tensor, alpha_prod: float, prediction_type: str, scale: float
) -> Tensor:
    """The model output shifted by classifier guidance (table above); unchanged where ᾱ_t = 0.

    Args:
        model_output: the (classifier-free guided) prediction, (B, C, h, w), of type ``prediction_type``.
        gradient: g, (B, C, h, w).
        alpha_prod: ᾱ_t in [0, 1].
        prediction_type: epsilon | v_prediction | sample.
        scale: s.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"classifier guidance needs a model predicting one of {PREDICTION_TYPES}; the scheduler says "
            f"prediction_type={prediction_type!r}."
        )
    if alpha_prod <= 0.0:
        return model_output
    sigma, alpha = (1 - alpha_prod) ** 0.5, alpha_prod**0.5
    factor = {"epsilon": -sigma, "v_prediction": -sigma / alpha, "sample": sigma**2 / alpha}[prediction_type]
    return model_output + (scale * factor) * gradient.to(model_output.dtype)
