"""Classifier guidance: the classifier model, the shift's sign and scale against a hand computation, bad labels.

The pipeline parts run on the tiny diffusers-written SD folder of conftest.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.models.classifier import ClassifierConfig, NoiseAwareClassifier
from latentdiff.schedulers import DDIMScheduler, EulerDiscreteScheduler
from pipelines import LatentPipeline
from pipelines.classifier_guidance import guide_model_output

LATENT_SHAPE = (4, 8, 8)  # the tiny model's latents (32 px / VAE factor 4)
PROMPT = "a red circle in the top left"


class ToyClassifier(nn.Module):
    """log p(y | x) = −½ |x − μ_y|² (unnormalised): its gradient is μ_y − x, known by hand."""

    def __init__(self, means: torch.Tensor) -> None:
        super().__init__()
        self.config = ClassifierConfig(attributes=(("mean", means.shape[0]),))
        self.means = nn.Parameter(means)

    def log_prob(self, sample: torch.Tensor, timestep, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return -0.5 * (sample - self.means[labels["mean"]]).pow(2).flatten(1).sum(1)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir) -> LatentPipeline:
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def toy() -> ToyClassifier:
    return ToyClassifier(torch.randn(3, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1)))


def one_step(pipe: LatentPipeline, prediction_type: str) -> LatentPipeline:
    """The pipeline with a one-step DDIM from t = 999 (trailing spacing) for the given prediction type."""
    scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", prediction_type=prediction_type
    )
    other = LatentPipeline(pipe.unet, scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer)
    other.set_progress_bar_config(disable=True)
    return other


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_guided_step_moves_by_the_hand_computed_shift(pipe, toy, prediction_type):
    """One DDIM step x_T → x₀' with ε̂' = ε̂ − s √(1 − ᾱ_T) g and g = μ_y − x_T: the final latent moves by
    Δε̂ (√(1 − ᾱ') − √ᾱ' √(1 − ᾱ_T)/√ᾱ_T), ᾱ' = ᾱ after the last step. A v-model gets v̂' = v̂ + Δε̂/√ᾱ_T, which
    gives the sampler the same ε̂' and x̂₀', hence the same shift (with classifier-free guidance on as well)."""
    sampler = one_step(pipe, prediction_type)
    x_T = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    labels = {"mean": [2, 0]}
    scale = 2.0
    arguments = dict(latents=x_T, num_inference_steps=1, guidance_scale=3.0, output_type="latent")
    plain = sampler([PROMPT] * 2, **arguments).images
    guided = sampler(
        [PROMPT] * 2, classifier=toy, classifier_guidance_scale=scale, class_labels=labels, **arguments
    )
    scheduler = sampler.scheduler
    alpha_prod = float(scheduler.alphas_cumprod[999])
    alpha_prod_after = scheduler.final_alpha_cumprod
    gradient = toy.means.detach()[[2, 0]] - x_T  # ∇ log p(y | x_T) by hand
    delta_epsilon = -scale * (1 - alpha_prod) ** 0.5 * gradient
    expected = delta_epsilon * (
        (1 - alpha_prod_after) ** 0.5 - alpha_prod_after**0.5 * ((1 - alpha_prod) / alpha_prod) ** 0.5
    )
    assert torch.allclose(guided.images - plain, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # the sign: x̂₀ (here the final latent) moves up the classifier's log-probability, towards μ_y
    assert ((guided.images - plain) * gradient).sum() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_prediction_type_gets_the_same_epsilon_and_x0_shift(prediction_type):
    g = torch.Generator().manual_seed(2)
    x_t, epsilon, x0_true, gradient = (torch.randn(2, *LATENT_SHAPE, generator=g) for _ in range(4))
    alpha_prod, scale = 0.3, 1.7
    alpha, sigma = alpha_prod**0.5, (1 - alpha_prod) ** 0.5
    x_t = alpha * x0_true + sigma * epsilon
    output = {"epsilon": epsilon, "v_prediction": alpha * epsilon - sigma * x0_true, "sample": x0_true}
    guided = guide_model_output(output[prediction_type], gradient, alpha_prod, prediction_type, scale)
    as_epsilon = {
        "epsilon": guided,
        "v_prediction": alpha * guided + sigma * x_t,
        "sample": (x_t - alpha * guided) / sigma,
    }[prediction_type]
    assert torch.allclose(as_epsilon, epsilon - scale * sigma * gradient, atol=1e-5)
    assert torch.equal(
        guide_model_output(output[prediction_type], gradient, 0.0, prediction_type, scale),
        output[prediction_type],
    )  # ᾱ = 0: no information about y in x_t, no guidance


def test_scale_zero_is_unguided_and_a_real_classifier_steers_an_euler_sampler(pipe):
    classifier = NoiseAwareClassifier(ClassifierConfig(block_out_channels=(8, 16), time_embed_dim=16))
    euler = LatentPipeline(
        pipe.unet,
        EulerDiscreteScheduler.from_config(pipe.scheduler.config),
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
    )
    euler.set_progress_bar_config(disable=True)
    arguments = dict(num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(3))
    labels = {"color": 1, "shape": 2, "cell": 4}
    plain = euler(PROMPT, **arguments).images
    arguments["generator"] = torch.Generator().manual_seed(3)
    off = euler(
        PROMPT, classifier=classifier, classifier_guidance_scale=0.0, class_labels=labels, **arguments
    )
    arguments["generator"] = torch.Generator().manual_seed(3)
    on = euler(
        PROMPT, classifier=classifier, classifier_guidance_scale=50.0, class_labels=labels, **arguments
    )
    assert torch.equal(off.images, plain)
    assert (on.images - plain).abs().max() > 1e-4


@pytest.mark.parametrize(
    "labels,message",
    [
        ({"colour": 1}, r"class_labels has \['colour'\] but the classifier predicts \['mean'\]"),
        ({"mean": 1, "shape": 0}, "but the classifier predicts"),
        ({"mean": 3}, "outside the classifier's 3 classes"),
        ({"mean": [0, 1, 2]}, "has 3 entries for 2 images"),
        (None, "classifier guidance needs class_labels"),
    ],
)
def test_labels_that_do_not_match_the_classifier_are_a_clear_error(pipe, toy, labels, message):
    with pytest.raises(ValueError, match=message):
        pipe([PROMPT] * 2, num_inference_steps=1, classifier=toy, class_labels=labels, output_type="latent")


def test_labels_without_a_classifier_are_an_error(pipe):
    with pytest.raises(ValueError, match="without a classifier"):
        pipe(PROMPT, num_inference_steps=1, class_labels={"mean": 0}, output_type="latent")


def test_classifier_log_prob_sums_the_heads_and_round_trips_through_files(tmp_path):
    config = ClassifierConfig(
        attributes=(("color", 3), ("cell", 5)), block_out_channels=(8, 16), time_embed_dim=16
    )
    classifier = NoiseAwareClassifier(config).eval()
    x = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10.0, 900.5])
    logits = classifier(x, t)
    assert logits["color"].shape == (2, 3) and logits["cell"].shape == (2, 5)
    labels = {"color": torch.tensor([0, 2]), "cell": torch.tensor([4, 1])}
    by_hand = sum(F.log_softmax(logits[k], -1)[torch.arange(2), labels[k]] for k in labels)
    assert torch.allclose(classifier.log_prob(x, t, labels), by_hand)
    assert not torch.allclose(
        classifier(x, torch.tensor([500.0, 500.0]))["cell"], logits["cell"]
    )  # t matters
    classifier.save_pretrained(tmp_path / "classifier")
    loaded = NoiseAwareClassifier.from_pretrained(tmp_path / "classifier")
    assert loaded.config == config
    assert torch.equal(loaded(x, t)["cell"], logits["cell"])
    with pytest.raises(ValueError, match="attributes"):
        ClassifierConfig(attributes=(("color", 1),))
