"""What every sampler shares: the config, the inference timesteps, x̂₀ / ε̂ from a model output, and config files.

DDPM and DDIM use all of it; the σ-samplers (Euler, Heun, DPM-Solver++) add their own timesteps in sigmas.py.

| code name                | symbol               | equation                                                              |
|--------------------------|----------------------|-----------------------------------------------------------------------|
| ``alpha_prod_t``         | ᾱ_t                  | noise level of the sample the model saw (noise_schedule.py)           |
| ``pred_original_sample`` | x̂₀                   | ε-prediction: x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (Ho et al. 2020 eq. 15) |
|                          |                      | v-prediction: x̂₀ = √ᾱ_t x_t − √(1 − ᾱ_t) v̂ (Salimans & Ho 2022 §4)    |
| ``pred_epsilon``         | ε̂                    | x̂₀-prediction: ε̂ = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t)                      |
|                          |                      | v-prediction: ε̂ = √ᾱ_t v̂ + √(1 − ᾱ_t) x_t                            |
| ``timesteps``            | τ_1 > … > τ_n        | the visited sub-sequence of 0 … T−1 (Song et al. 2021 §4.2)          |

The previous timestep of τ_i is τ_{i+1}, read from ``timesteps``: it is never recomputed as τ_i − T/n, which is
wrong for ``linspace`` spacing and for ``trailing`` spacing when n does not divide T (diffusers issues #12633,
#11347). After the last timestep comes x₀, marked by the previous timestep −1.

A scheduler is configured by a frozen dataclass whose field names are diffusers' keyword names, and is saved as
``scheduler_config.json`` in diffusers' format, so diffusers' schedulers and these load each other's files. The
config is also a read-only dict (as diffusers' ``FrozenDict``), so ``config["prediction_type"]`` works and
``diffusers.SomeScheduler.from_config(ours.config)`` accepts it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor

from latentdiff.noise_schedule import BETA_SCHEDULES, NoiseSchedule, make_betas, rescale_betas_zero_snr

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SchedulerT = TypeVar("SchedulerT", bound="Scheduler")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the parameter when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {choices}.")


class FrozenConfig(dict):
    """A frozen dataclass that is also a read-only dict of its fields, as diffusers' ``FrozenDict`` config is.

    ``config.prediction_type`` and ``config["prediction_type"]`` both read a value, and diffusers'
    ``SomeScheduler.from_config(config)`` (which asks for a dict) accepts it. Subclasses are frozen dataclasses; they
    check and normalise their values in :meth:`validate`, after which the dict is filled once.
    """

    def __post_init__(self) -> None:
        self.validate()
        dict.update(self, self.as_dict())

    def validate(self) -> None:
        """Check (and normalise with ``object.__setattr__``) the field values; subclasses extend it."""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"{type(self).__name__} is read-only; make a changed copy with "
            "SchedulerClass.from_config(config, name=value) or dataclasses.replace(config, name=value)."
        )

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __reduce__(
        self,
    ) -> tuple:  # copy and pickle rebuild through __init__ (dict's own way would write items)
        return (_rebuild_config, (type(self), self.as_dict()))


def _rebuild_config(config_class: type[FrozenConfig], values: dict[str, Any]) -> FrozenConfig:
    return config_class(**values)


@dataclass(frozen=True)
class ScheduleConfig(FrozenConfig):
    """What every sampler is configured by: the training noise schedule, the prediction type, the spacing.

    Field names and defaults are diffusers'.
    """

    num_train_timesteps: int = 1000  # T, the length of the training chain
    beta_start: float = 0.0001  # first β of the linear, scaled_linear and sigmoid schedules
    beta_end: float = 0.02  # last β of those schedules
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
    trained_betas: tuple[float, ...] | None = None  # explicit β_t (length T), replaces the named schedule
    prediction_type: str = "epsilon"  # what the model predicts: epsilon (ε) | sample (x₀) | v_prediction (v)
    timestep_spacing: str = "leading"  # leading | trailing | linspace (Lin et al. 2024, Table 2)
    steps_offset: int = 0  # added to leading timesteps (Stable Diffusion uses 1)
    rescale_betas_zero_snr: bool = False  # make ᾱ_{T−1} = 0 (Lin et al. 2024, Algorithm 1)

    def validate(self) -> None:
        # normalise numpy / torch values so that the config compares, hashes and writes to JSON as plain data
        if self.trained_betas is not None:
            betas = tuple(float(b) for b in torch.as_tensor(self.trained_betas).flatten())
            object.__setattr__(self, "trained_betas", betas)
        for name, lowest in (("num_train_timesteps", 1), ("steps_offset", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
                raise ValueError(f"{name}={value!r} must be an integer >= {lowest}.")
            object.__setattr__(self, name, int(value))
        for name in ("beta_start", "beta_end"):
            object.__setattr__(self, name, float(getattr(self, name)))
        require_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        require_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        require_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)


@dataclass(frozen=True)
class SchedulerConfig(ScheduleConfig):
    """DDPM's and DDIM's configuration: the schedule plus clipping or dynamic thresholding of x̂₀."""

    clip_sample: bool = True  # clamp x̂₀ to [−clip_sample_range, clip_sample_range] (pixel-space models)
    clip_sample_range: float = 1.0
    thresholding: bool = False  # Imagen's dynamic thresholding of x̂₀ (replaces clip_sample when on)
    dynamic_thresholding_ratio: float = 0.995  # quantile of |x̂₀| that sets the threshold s
    sample_max_value: float = 1.0  # upper bound of s

    def validate(self) -> None:
        super().validate()
        for name in ("clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ValueError(
                f"dynamic_thresholding_ratio={self.dynamic_thresholding_ratio} must lie in (0, 1]."
            )
        for name in ("clip_sample_range", "sample_max_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")


def spaced_timesteps(
    timestep_spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0
) -> list[int]:
    """The n timesteps a sampler visits, in descending order, as diffusers spaces them (Lin et al. 2024 Table 2).

    With T = 1000 and n = 10:
      leading:  i · (T // n) + steps_offset                   → 900, 800, …, 100, 0   (+ steps_offset)
      trailing: round(T − i · T / n) − 1                      → 999, 899, …, 199, 99
      linspace: round(i · (T − 1) / (n − 1))                  → 999, 888, …, 111, 0
    Only ``leading`` uses ``steps_offset``, as in diffusers. ``trailing`` and ``linspace`` are computed with numpy's
    ``arange`` and ``linspace`` so that values at exact halves round as in diffusers (n = 48 gives 936, not 937);
    unlike diffusers, ``trailing`` keeps exactly n values (its ``np.arange`` yields an extra −1 for 62 values of
    n ≤ 1000, e.g. n = 61).
    """
    require_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    T, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "leading":
        descending = [i * (T // n) + steps_offset for i in reversed(range(n))]
    elif timestep_spacing == "trailing":
        descending = (np.round(np.arange(T, 0, -T / n)[:n]) - 1).astype(np.int64).tolist()
    else:  # linspace
        descending = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64).tolist()
    return descending


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    """n as an int in [1, T], or a ValueError naming ``num_inference_steps``."""
    try:
        n = operator.index(num_inference_steps)
    except TypeError:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer.") from None
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={n} must lie in [1, num_train_timesteps={num_train_timesteps}]: the model was "
            f"trained on {num_train_timesteps} noise levels and a sampler can visit each at most once."
        )
    return n


def extract_timestep(timestep: int | float | Tensor) -> float:
    """One timestep as a Python number (a tensor must hold exactly one value)."""
    if isinstance(timestep, Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be one number; got a tensor of shape {tuple(timestep.shape)}.")
        return timestep.item()
    return timestep


def dynamic_threshold(pred_original_sample: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022 §2.3) of x̂₀, shape (B, C, H, W).

    Per sample, s = the ``ratio`` quantile of |x̂₀|, clamped to [1, max_value]; then x̂₀ ← clamp(x̂₀, −s, s) / s.
    With s = 1 this is plain clipping to [−1, 1].
    """
    dtype = pred_original_sample.dtype
    flat = pred_original_sample.reshape(pred_original_sample.shape[0], -1)  # (B, C·H·W)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # torch.quantile needs float32 or float64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (flat.clamp(-s, s) / s).reshape(pred_original_sample.shape).to(dtype)


@dataclass
class SchedulerOutput:
    """What one sampler step returns.

    prev_sample: x_{τ_{i+1}}, the sample at the previous timestep, shape (B, C, H, W); x₀ after the last step.
    pred_original_sample: x̂₀, the model's estimate of the clean sample (after clipping or thresholding).
    """

    prev_sample: Tensor
    pred_original_sample: Tensor


class Scheduler:
    """The interface every sampler implements (diffusers' own); subclasses add ``step``.

    Constructor keywords are the fields of ``config_class`` (diffusers' names). The model is called by the caller's
    loop; a scheduler never sees it. ``step(..., return_dict=False)`` returns the tuple (prev_sample,
    pred_original_sample), as diffusers' schedulers do.
    """

    config_class: ClassVar[type[ScheduleConfig]] = SchedulerConfig
    order: ClassVar[int] = 1  # model evaluations per step (diffusers pipelines read this)
    init_noise_sigma: ClassVar[float] = 1.0  # x_T ~ N(0, I): the initial noise is not scaled

    def __init__(self, **config: Any) -> None:
        known = {f.name for f in fields(self.config_class)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown keyword(s) {unknown}; known ones are {sorted(known)}. "
                f"{type(self).__name__}.from_config(...) ignores unknown keys."
            )
        self.config = self.config_class(**config)
        c = self.config
        betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas)
        if c.rescale_betas_zero_snr:
            betas = rescale_betas_zero_snr(betas)
            if c.prediction_type == "epsilon":
                logger.warning(
                    "rescale_betas_zero_snr=True with prediction_type='epsilon': at ᾱ = 0 the last timestep's x̂₀ "
                    "cannot be computed from ε̂ (Lin et al. 2024 §3.2); train with prediction_type='v_prediction'."
                )
        self.noise_schedule = NoiseSchedule(betas)
        self.final_alpha_cumprod = 1.0  # ᾱ after the last step: x₀ has no noise (DDIM may override)
        self.num_inference_steps: int | None = None
        self.timesteps: Tensor | None = None  # (n,) int64, descending; set by set_timesteps
        self._timestep_list: list[int] = []  # self.timesteps as Python ints (no device sync when stepping)
        self._step_index: dict[int, int] = {}  # timestep -> its position in self.timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    def compatibles(self) -> list[type[Scheduler]]:
        """The sampler classes that load this one's config (``OtherClass.from_config(self.config)``): all of them."""
        from latentdiff.schedulers.registry import SCHEDULER_CLASSES

        return list(SCHEDULER_CLASSES.values())

    @staticmethod
    def _output(
        prev_sample: Tensor, pred_original_sample: Tensor, return_dict: bool
    ) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """What ``step`` returns: a SchedulerOutput, or with ``return_dict=False`` the tuple of its two fields."""
        if return_dict:
            return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
        return prev_sample, pred_original_sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t, float64, shape (T,)."""
        return self.noise_schedule.alphas_cumprod

    # ----- timesteps -------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps to sample with (``self.timesteps``, int64, descending, on ``device``).

        Args:
            num_inference_steps: n, spaced by ``timestep_spacing``; or None when ``timesteps`` is given.
            device: where ``self.timesteps`` lives (the model's device).
            timesteps: custom timesteps instead of n (diffusers' DDPM keyword): distinct integers in [0, T),
                descending, e.g. [999, 500, 100, 0]; each step goes to the next one, the last to x₀.
        """
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps to set_timesteps.")
        if timesteps is not None:
            chosen = [int(t) for t in timesteps]
            if (
                not chosen
                or any(not 0 <= t < T for t in chosen)
                or chosen != sorted(set(chosen), reverse=True)
            ):
                raise ValueError(
                    f"timesteps={chosen[:8]}{'...' if len(chosen) > 8 else ''} must be distinct integers in "
                    f"[0, {T}) in descending order, e.g. [{T - 1}, {T // 2}, 0]."
                )
        else:
            chosen = self._spaced_timesteps(check_num_inference_steps(num_inference_steps, T))
        self.num_inference_steps = len(chosen)
        self._use_timesteps(chosen, device)

    def _spaced_timesteps(self, n: int) -> list[int]:
        """:func:`spaced_timesteps` by this config, refusing a first timestep past the trained ones."""
        T = self.config.num_train_timesteps
        chosen = spaced_timesteps(self.config.timestep_spacing, T, n, self.config.steps_offset)
        # only leading spacing with a steps_offset can overshoot (diffusers issue #10003)
        if chosen[0] > T - 1:
            raise ValueError(
                f"steps_offset={self.config.steps_offset} with num_inference_steps={n} puts the first timestep "
                f"at {chosen[0]}, past the last trained one ({T - 1}); use fewer steps or steps_offset=0."
            )
        return chosen

    def _use_timesteps(self, timesteps: list[int], device: str | torch.device | None = None) -> None:
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)
        self._timestep_list = timesteps
        self._step_index = {t: i for i, t in enumerate(timesteps)}

    def previous_timestep(self, timestep: int | Tensor) -> int:
        """τ_{i+1} for ``timestep`` = τ_i, read from ``self.timesteps``; −1 after the last one (x₀ comes next)."""
        if not self._timestep_list:
            raise ValueError(
                f"call {type(self).__name__}.set_timesteps(num_inference_steps) before stepping."
            )
        t = int(extract_timestep(timestep))
        if t not in self._step_index:
            shown = (
                self._timestep_list if len(self._timestep_list) <= 8 else [*self._timestep_list[:8], "..."]
            )
            raise ValueError(
                f"timestep={t} is not in this scheduler's timesteps {shown}; pass one of scheduler.timesteps "
                "(set_timesteps chose them)."
            )
        i = self._step_index[t]
        return self._timestep_list[i + 1] if i + 1 < len(self._timestep_list) else -1

    def _alpha_prod(self, timestep: int) -> float:
        """ᾱ at ``timestep`` as a Python float (float64); ``final_alpha_cumprod`` for −1, i.e. after the last step."""
        return float(self.alphas_cumprod[timestep]) if timestep >= 0 else self.final_alpha_cumprod

    # ----- the model output --------------------------------------------------------------------------------------

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """The model input for x_t: x_t itself (DDPM and DDIM do not rescale it)."""
        return sample

    def _predict_original_and_epsilon(
        self, model_output: Tensor, sample: Tensor, alpha_prod_t: float
    ) -> tuple[Tensor, Tensor]:
        """(x̂₀, ε̂) from the model output on ``sample`` = x_t at noise level ᾱ_t (table above)."""
        sqrt_alpha_prod, sqrt_beta_prod = math.sqrt(alpha_prod_t), math.sqrt(1 - alpha_prod_t)
        if self.config.prediction_type == "epsilon":
            pred_epsilon = model_output
            pred_original_sample = (sample - sqrt_beta_prod * model_output) / sqrt_alpha_prod
        elif self.config.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - sqrt_alpha_prod * model_output) / sqrt_beta_prod
        else:  # v_prediction
            pred_original_sample = sqrt_alpha_prod * sample - sqrt_beta_prod * model_output
            pred_epsilon = sqrt_alpha_prod * model_output + sqrt_beta_prod * sample
        return pred_original_sample, pred_epsilon

    def _clip_or_threshold(self, pred_original_sample: Tensor) -> Tensor:
        """Dynamic thresholding if ``thresholding``, else clamping if ``clip_sample``, else x̂₀ unchanged."""
        c = self.config
        if c.thresholding:
            return dynamic_threshold(pred_original_sample, c.dynamic_thresholding_ratio, c.sample_max_value)
        if c.clip_sample:
            return pred_original_sample.clamp(-c.clip_sample_range, c.clip_sample_range)
        return pred_original_sample

    # ----- noise -------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_noise_arguments(
        eta: float, sample: Tensor, generator: torch.Generator | None, variance_noise: Tensor | None
    ) -> None:
        if not eta >= 0:
            raise ValueError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM's posterior variance).")
        if generator is not None and variance_noise is not None:
            raise ValueError("pass either generator or variance_noise to step(), not both.")
        if variance_noise is not None and variance_noise.shape != sample.shape:
            raise ValueError(
                f"variance_noise has shape {tuple(variance_noise.shape)} but sample has {tuple(sample.shape)}."
            )

    @staticmethod
    def _noise_like(
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        variance_noise: Tensor | None,
    ) -> Tensor:
        """z ~ N(0, I) shaped like ``sample``: ``variance_noise`` if given, else drawn from ``generator`` (a list of
        B generators draws sample i from generator i, as diffusers does)."""
        if variance_noise is not None:
            return variance_noise.to(device=sample.device, dtype=sample.dtype)
        if isinstance(generator, list):
            return torch.cat(
                [Scheduler._noise_like(sample[i : i + 1], g, None) for i, g in enumerate(generator)]
            )
        device = generator.device if generator is not None else sample.device  # draw where it lives
        noise = torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype)
        return noise.to(sample.device)

    # ----- forward process (training) ----------------------------------------------------------------------------

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor | int) -> Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε; see :meth:`NoiseSchedule.add_noise`."""
        return self.noise_schedule.add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor | int) -> Tensor:
        """v_t = √ᾱ_t ε − √(1 − ᾱ_t) x₀; see :meth:`NoiseSchedule.get_velocity`."""
        return self.noise_schedule.get_velocity(sample, noise, timesteps)

    # ----- config files ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as diffusers writes it to ``scheduler_config.json`` (with ``_class_name``)."""
        values = dataclasses.asdict(self.config)
        if values["trained_betas"] is not None:
            values["trained_betas"] = list(values["trained_betas"])
        try:
            diffusers_version = metadata.version("diffusers")
        except metadata.PackageNotFoundError:
            diffusers_version = "0.0.0"
        return {"_class_name": type(self).__name__, "_diffusers_version": diffusers_version, **values}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write ``scheduler_config.json`` into ``save_directory`` (created if missing); returns the file's path.

        ``kwargs`` (diffusers' ``push_to_hub`` and the like) are not supported: a non-false one is an error.
        """
        used = sorted(name for name, value in kwargs.items() if value)
        if used:
            raise TypeError(f"save_pretrained does not support {used}; it writes the local file only.")
        path = Path(save_directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    save_config = save_pretrained  # diffusers' ConfigMixin name for the same file

    @classmethod
    def from_config(
        cls: type[SchedulerT], config: SchedulerConfig | Mapping[str, Any], **overrides: Any
    ) -> SchedulerT:
        """A scheduler of this class from another scheduler's ``.config`` or a dict (e.g. a loaded JSON file).

        Keys this class does not use (another sampler's options, diffusers' bookkeeping) are ignored with a log
        note, so ``DDPMScheduler.from_config(ddim.config)`` switches samplers. ``overrides`` replace values and must
        be known keywords, e.g. ``from_config(config, timestep_spacing="trailing")``.
        """
        values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        known = {f.name for f in fields(cls.config_class)}
        ignored = sorted(k for k in values if k not in known and not k.startswith("_"))
        if ignored:
            logger.info("%s ignores config keys it does not use: %s", cls.__name__, ignored)
        written_for = values.get("_class_name")
        if written_for is not None and written_for != cls.__name__:
            logger.info("loading a config written for %s into %s", written_for, cls.__name__)
        return cls(**{**{k: v for k, v in values.items() if k in known}, **overrides})

    @classmethod
    def from_pretrained(
        cls: type[SchedulerT],
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **overrides: Any,
    ) -> SchedulerT:
        """Load ``scheduler_config.json`` from a folder (``<path>/<subfolder>/``), or from a Hub repository id.

        A folder written by diffusers (DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, …)
        loads; see :meth:`from_config` for keys this class does not use and for ``overrides``.
        """
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            path = folder / subfolder / CONFIG_NAME if subfolder else folder / CONFIG_NAME
            if not path.is_file():
                raise FileNotFoundError(
                    f"no {CONFIG_NAME} in {path.parent}; is subfolder={subfolder!r} right?"
                )
        else:  # a Hub id: needs the network (never used by the tests)
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(pretrained_model_name_or_path), CONFIG_NAME, subfolder=subfolder))
        return cls.from_config(json.loads(path.read_text()), **overrides)
