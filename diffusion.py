"""Gaussian diffusion: noise schedules, the forward process, the training loss and the samplers.

References (equation numbers are the papers'):
  [DDPM]  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"
  [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
  [DDIM]  Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models"
  [PD]    Salimans, Ho 2022, "Progressive Distillation" (v-prediction)
  [MSNR]  Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"
  [DPMS]  Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"

This module knows nothing of optimizers, files or devices beyond its own buffers: move it with
`Diffusion(...).to(device)` once, like a model. Shapes: x0, xt, eps are (B, ...) ; t is (B,) long.
Features built on it (editing/: inpainting, inversion, SDEdit; training/: distillation) use only its public
names: `timestep_batch`, `guided_model`, `draw_noise` / `noise_source`, `step`, `sample_steps`, ...; this module
imports none of them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from config import LOSS_WEIGHTINGS, OBJECTIVES, SAMPLERS, SCHEDULES, SPACINGS, VAR_TYPES, ConfigError, check_choice

# t_prev of the last sampling step: "before step 0", the data itself (alpha-bar = 1, no noise). Only
# `Diffusion.alpha_bar_prev` gives it a value; it indexes no coefficient table.
DATA_T = -1
ETA_SAMPLERS = ("ddim",)  # the samplers that take eta; the others refuse a nonzero eta


class NoiseSource:
    """Where the samplers' Gaussian noise comes from: `randn(shape, device)` returns a standard normal tensor of
    `shape` on `device`. Every draw of `sample`, `sample_steps` and the editing algorithms goes through one.
    Subclass it for other streams (sampling/generation.py's SampleNoise: one generator per sample)."""

    def randn(self, shape, device=None) -> torch.Tensor:
        raise NotImplementedError


class TorchNoise(NoiseSource):
    """Noise from one optional torch.Generator (None: torch's global generator). Drawn on the generator's
    device, then moved, so a CPU generator gives the same numbers on any device."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"TorchNoise takes a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def randn(self, shape, device=None) -> torch.Tensor:
        gen_device = self.generator.device if self.generator is not None else device
        x = torch.randn(shape, generator=self.generator, device=gen_device)
        return x if device is None else x.to(device)


def noise_source(generator: Optional[torch.Generator | NoiseSource]) -> NoiseSource:
    """The NoiseSource for a `generator=` argument: None or a torch.Generator (TorchNoise), or a NoiseSource
    itself. Anything else is refused, also when it has a `randn` of its own."""
    if isinstance(generator, NoiseSource):
        return generator
    if generator is None or isinstance(generator, torch.Generator):
        return TorchNoise(generator)
    raise TypeError(f"generator must be None, a torch.Generator or a diffusion.NoiseSource (e.g. "
                    f"sampling.generation.SampleNoise), got {type(generator).__name__}; wrap other noise streams "
                    f"in a NoiseSource subclass")


class StepOutput(NamedTuple):
    """One sampler step: x at t_prev, the x0 predicted at t, and the state the next step needs (None
    except for DPM-Solver++(2M), which keeps the previous x0 and log-SNR step)."""
    prev_sample: torch.Tensor
    x0_pred: torch.Tensor
    state: Optional[tuple]


class StepRecord(NamedTuple):
    """What `Diffusion.sample_steps` yields after each model evaluation: step i went from t to t_prev."""
    i: int
    t: int
    t_prev: int
    xt: torch.Tensor       # x at t_prev (the sample itself after the last step)
    x0_pred: torch.Tensor  # x0 predicted at t


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> torch.Tensor:
    """Beta schedule in float64, shape (T,)."""
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "linear":  # [DDPM] Sec. 4: betas linear from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    # cosine, [iDDPM] Eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    abar = f / f[0]
    # beta_t = 1 - abar_t / abar_{t-1}, clipped at 0.999 to avoid a singularity at t = T.
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)


class Diffusion(nn.Module):
    """Schedule buffers + forward process + loss + samplers. `model(xt, t, y=None)` is the only
    model interface; class label -1 means "no label" (the null label of classifier-free guidance)."""

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, objective: str = "eps", loss_weighting: str = "none",
                 min_snr_gamma: float = 5.0, var_type: str = "fixed_small",
                 timestep_spacing: str = "leading"):
        super().__init__()
        check_choice("objective", objective, OBJECTIVES)
        check_choice("loss weighting", loss_weighting, LOSS_WEIGHTINGS)
        check_choice("variance type", var_type, VAR_TYPES)
        check_choice("timestep spacing", timestep_spacing, SPACINGS)
        if num_timesteps < 1:
            raise ConfigError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps, self.objective = num_timesteps, objective
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        self.var_type, self.timestep_spacing = var_type, timestep_spacing

        # Everything is computed once in float64 and stored as float32 buffers.
        betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # [DDPM] Eq. 7: posterior q(x_{t-1} | x_t, x_0) = N(mean_coef1 x0 + mean_coef2 xt, beta_tilde)
        post_var = betas * (1 - abar_prev) / (1 - abar)
        buffers = {
            "betas": betas, "alphas_cumprod": abar,
            "sqrt_abar": abar.sqrt(), "sqrt_one_minus_abar": (1 - abar).sqrt(),
            "posterior_variance": post_var,
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            "snr": abar / (1 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @classmethod
    def from_config(cls, dcfg) -> "Diffusion":
        return cls(dcfg.num_timesteps, dcfg.schedule, dcfg.beta_start, dcfg.beta_end, dcfg.objective,
                   dcfg.loss_weighting, dcfg.min_snr_gamma, dcfg.var_type, dcfg.timestep_spacing)

    # ------------------------------------------------------------------ coefficients
    @staticmethod
    def gather(coef: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """coef[t] shaped (B, 1, ..., 1) to broadcast against a (B, ...) tensor of `ndim` dims; t in 0..T-1
        (the "before step 0" of the last sampling step is `alpha_bar_prev`'s, not a coefficient index)."""
        return coef[t].view(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """[DDPM] Eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return (self.gather(self.sqrt_abar, t, x0.ndim) * x0
                + self.gather(self.sqrt_one_minus_abar, t, x0.ndim) * noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """[DDPM] Eqs. 6-7: mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.gather(self.posterior_mean_coef1, t, xt.ndim) * x0
                + self.gather(self.posterior_mean_coef2, t, xt.ndim) * xt)
        return mean, self.gather(self.posterior_variance, t, xt.ndim)

    # ------------------------------------------------------------------ objectives
    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output. v = sqrt(abar) eps - sqrt(1 - abar) x0 ([PD] Sec. 4)."""
        if self.objective == "eps":
            return eps
        if self.objective == "x0":
            return x0
        return (self.gather(self.sqrt_abar, t, x0.ndim) * eps
                - self.gather(self.sqrt_one_minus_abar, t, x0.ndim) * x0)

    def predict_x0_eps(self, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                       clip_x0: bool = False):
        """Model output -> (x0, eps) for every objective; the one conversion every sampler uses.
        Uses x_t = a x0 + s eps with a = sqrt(abar), s = sqrt(1 - abar), a^2 + s^2 = 1."""
        a = self.gather(self.sqrt_abar, t, xt.ndim)
        s = self.gather(self.sqrt_one_minus_abar, t, xt.ndim)
        if self.objective == "eps":
            eps = model_out
            x0 = (xt - s * eps) / a
        elif self.objective == "x0":
            x0 = model_out
            eps = (xt - a * x0) / s
        else:  # v: x0 = a xt - s v, eps = s xt + a v
            x0 = a * xt - s * model_out
            eps = s * xt + a * model_out
        if clip_x0:
            # Clamp x0 to the data range and re-derive eps so that (x0, eps) stay consistent with x_t.
            x0 = x0.clamp(-1, 1)
            eps = (xt - a * x0) / s
        return x0, eps

    # ------------------------------------------------------------------ training
    def training_losses(self, model: Callable, x0: torch.Tensor, y: Optional[torch.Tensor] = None,
                        t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None):
        """Per-example weighted MSE, shape (B,), and the timesteps used, shape (B,)."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y).float()
        mse = (out - self.target(x0, noise, t)).pow(2).flatten(1).mean(dim=1)  # (B,)
        return mse * self.loss_weight(t), t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """[MSNR] Eq. 9-10: weight min(SNR, gamma) on the x0-MSE, rewritten for each objective.
        The x0-MSE equals SNR * eps-MSE and (SNR + 1) * v-MSE."""
        if self.loss_weighting == "none":
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.objective]

    def loss(self, model: Callable, x0: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scalar training loss: uniform t, Gaussian noise ([DDPM] Algorithm 1)."""
        return self.training_losses(model, x0, y)[0].mean()

    # ------------------------------------------------------------------ sampling
    # Notation (variable -> paper symbol), as in diffusers' DDIMScheduler.step. abar is [DDPM]'s alpha-bar_t,
    # which [DDIM] writes alpha_t and [DPMS] splits as alpha_t = sqrt(abar), sigma_t = sqrt(1 - abar).
    #   t, t_prev        -> the step's timesteps t > t_prev ([DDIM] tau_i, tau_{i-1}); t_prev = DATA_T: the data
    #   abar, abar_prev  -> alpha-bar_t, alpha-bar_{t_prev}   ([DDIM] alpha_t, alpha_{t-1}; alpha_0 := 1)
    #   x0, eps          -> "predicted x_0" f_theta(x_t) ([DDIM] Eq. 9; [DPMS] x_theta), eps_theta(x_t, t)
    #   sigma, noise     -> sigma_t(eta) ([DDIM] Eq. 16) and z ~ N(0, I) ([DDPM] Algorithm 2)
    #   lam, h, d        -> lambda_t = log(alpha_t / sigma_t), h_i = lambda_{t_i} - lambda_{t_{i-1}}, D_i ([DPMS])
    def sampling_timesteps(self, sampler: str, steps: Optional[int] = None,
                           spacing: Optional[str] = None) -> list[int]:
        """Explicit, decreasing list of timesteps the sampler visits. Spacing defaults to the
        diffusion's (DDIM: "leading"), except for dpmpp2m, which defaults to "trailing": a grid that
        evaluates the model at t=0 gives the multistep solver one huge log-SNR step (t=k -> 0), where
        its second-order extrapolation is unstable (measured on the Gaussian oracle: std 0.61 instead
        of 0.50 at 20 steps); diffusers' DPM-Solver likewise ends at a positive t, then jumps to sigma=0."""
        check_choice("sampler", sampler, SAMPLERS)
        T = self.num_timesteps
        if sampler == "ddpm":
            if steps not in (None, T):
                raise ConfigError(f"the ddpm sampler uses all T={T} steps, got steps={steps}; for fewer "
                                  "steps use sampler ddim (eta=1 is the ancestral equivalent) or dpmpp2m")
            if spacing is not None:
                raise ConfigError(f"the ddpm sampler visits every timestep, so timestep spacing {spacing!r} "
                                  "does not apply; drop it or use sampler ddim or dpmpp2m")
            return list(range(T - 1, -1, -1))
        steps = T if steps is None else steps
        if not 1 <= steps <= T:
            raise ConfigError(f"steps must be between 1 and num_timesteps={T}, got {steps}")
        spacing = spacing or ("trailing" if sampler == "dpmpp2m" else self.timestep_spacing)
        check_choice("timestep spacing", spacing, SPACINGS)
        if spacing == "leading":      # [DDIM] Sec. D.2: 0, k, 2k, ... with k = T // steps
            ts = [i * (T // steps) for i in range(steps)]
        elif spacing == "trailing":   # ends exactly at T-1 (Lin et al. 2024, Table 2)
            ts = [round(T - i * T / steps) - 1 for i in range(steps)][::-1]
        else:                         # evenly spaced over [0, T-1], rounded
            ts = [round(i * (T - 1) / max(steps - 1, 1)) for i in range(steps)]
        return sorted(set(ts), reverse=True)

    @staticmethod
    def step_pairs(timesteps: list[int]) -> list[tuple[int, int]]:
        """(t, t_prev) of each step down a decreasing timestep list; the last step goes to DATA_T."""
        return list(zip(timesteps, [*timesteps[1:], DATA_T]))

    @staticmethod
    def check_eta(sampler: Optional[str], eta: Optional[float], name: str = "eta") -> float:
        """eta as the steps use it. Only the samplers in ETA_SAMPLERS take eta; None or 0 (what the scripts
        pass every sampler by default) means "not given", any other eta is refused by the other samplers
        rather than silently dropped. sampler None checks the range only (a script's flag, before loading);
        `name` is the flag or key the message names."""
        if sampler is not None:
            check_choice("sampler", sampler, SAMPLERS)
        if eta is None:
            return 0.0
        if not 0 <= eta <= 1:  # NaN fails too (it gave all-black images)
            raise ConfigError(f"{name} {eta:g} is outside [0, 1] (eta must be >= 0 and at most 1): use 0 "
                              f"(deterministic DDIM) up to 1 (ancestral-like)")
        if sampler is None:
            return float(eta)
        if eta != 0 and sampler not in ETA_SAMPLERS:
            raise ConfigError(f"sampler {sampler} does not use eta (got eta={eta:g}); the samplers that take eta: "
                              f"{', '.join(ETA_SAMPLERS)}. Drop eta or use one of those")
        return float(eta)

    def guided_model(self, model: Callable, y: Optional[torch.Tensor], guidance_scale: float) -> Callable:
        """model_fn(xt, t) -> float32 output: the model with labels y, and classifier-free guidance (Ho &
        Salimans 2022, Eq. 6) at guidance_scale != 1 (the null label -1 in the second half of a doubled batch).
        Every objective's eps is affine in the model output for fixed x_t, so mixing raw outputs
        out_u + s (out_c - out_u) is the same as mixing eps."""
        if y is None or guidance_scale == 1.0:
            return lambda xt, t: model(xt, t, y).float()

        def guided(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            null = torch.full_like(y, -1)
            out = model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, null])).float()
            out_cond, out_uncond = out.chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)
        return guided

    @torch.no_grad()
    def sample(self, model: Callable, shape: tuple, sampler: str = "ddpm", steps: Optional[int] = None,
               eta: Optional[float] = None, x_T: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator | NoiseSource] = None, y: Optional[torch.Tensor] = None,
               guidance_scale: float = 1.0, clip_x0: bool = True, progress: bool = True,
               callback: Optional[Callable] = None, timestep_spacing: Optional[str] = None) -> torch.Tensor:
        """Draw samples of `shape` = (B, ...) from x_T (default: noise from `generator`: None, a torch.Generator
        or a NoiseSource, as every draw of the steps; `noise_source`). eta: ddim only
        (0 = deterministic). callback(i, t, x_t, x0_pred) is called after each step with the new x_t and
        the x0 predicted on the way; `sample_steps` gives the same per-step records as a generator."""
        eta = self.check_eta(sampler, eta)
        timesteps = self.sampling_timesteps(sampler, steps, timestep_spacing)
        noise_src = noise_source(generator)  # refuses a wrong generator even when no noise is drawn
        xt = x_T.to(self.betas.device) if x_T is not None else self.draw_noise(shape, noise_src)
        for rec in self.sample_steps(model, xt, timesteps, sampler, eta=eta, generator=noise_src, y=y,
                                     guidance_scale=guidance_scale, clip_x0=clip_x0, progress=progress):
            xt = rec.xt
            if callback is not None:
                callback(rec.i, rec.t, rec.xt, rec.x0_pred)
        return xt

    def sample_steps(self, model: Callable, x: torch.Tensor, timesteps: list[int], sampler: str,
                     eta: Optional[float] = None, generator: Optional[torch.Generator | NoiseSource] = None,
                     y: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, clip_x0: bool = True,
                     progress: bool = True) -> Iterator[StepRecord]:
        """Generator of a trajectory: from x = x_{timesteps[0]} down the decreasing `timesteps` and on to
        the data, one StepRecord per model evaluation. Arguments are checked now, before any step; the
        steps run as the records are consumed. Any decreasing subset of 0..T-1 works, so a trajectory can
        start at an intermediate t (x = q_sample(x0, t_start) with timesteps from t_start down)."""
        eta = self.check_eta(sampler, eta)
        ts = [int(t) for t in timesteps]
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or not 0 <= ts[-1] <= ts[0] < self.num_timesteps:
            raise ConfigError(f"timesteps must be a non-empty decreasing list in 0..{self.num_timesteps - 1}")
        if sampler == "ddpm" and ts != list(range(ts[0], -1, -1)):
            raise ConfigError("the ddpm sampler steps through every timestep: t, t-1, ..., 0")
        return self._run_steps(self.guided_model(model, y, guidance_scale), x.to(self.betas.device), ts, sampler,
                               eta, noise_source(generator), clip_x0, progress)

    @torch.no_grad()
    def _run_steps(self, model_fn, xt, timesteps, sampler, eta, noise_src, clip_x0, progress):
        """The loop, after improved-diffusion's p_sample_loop_progressive: evaluate, step, report. It owns
        the progress bar, which advances once per model evaluation as the steps actually run."""
        bar = tqdm(total=len(timesteps), desc=f"{sampler} sampling", leave=False, disable=not progress)
        state = None
        try:
            for i, (t, t_prev) in enumerate(self.step_pairs(timesteps)):
                model_out = model_fn(xt, self.timestep_batch(t, xt))
                noise = self.draw_noise(xt.shape, noise_src) if self.needs_noise(sampler, t_prev, eta) else None
                xt, x0, state = self.step(sampler, model_out, xt, t, t_prev, eta=eta, noise=noise, state=state,
                                          clip_x0=clip_x0)
                bar.update(1)
                yield StepRecord(i, t, t_prev, xt, x0)
        finally:  # also when the caller stops early
            bar.close()

    @staticmethod
    def needs_noise(sampler: str, t_prev: int, eta: float = 0.0) -> bool:
        """Whether the step to t_prev adds fresh noise z: the ancestral steps (ddpm, ddim with eta > 0) do,
        except the last one, which lands on the data (t_prev = DATA_T)."""
        return t_prev >= 0 and (sampler == "ddpm" or (sampler == "ddim" and eta > 0))

    def step(self, sampler: str, model_out: torch.Tensor, xt: torch.Tensor, t: int, t_prev: int,
             eta: float = 0.0, noise: Optional[torch.Tensor] = None, state: Optional[tuple] = None,
             clip_x0: bool = False) -> StepOutput:
        """One step of `sampler` from x_t to x_{t_prev}, given the model output at (x_t, t). Pure: the
        caller draws `noise` (exactly when needs_noise says so) and threads `state` from step to step.
        t_prev is below t (ddpm: t - 1) or DATA_T; deterministic ddim (eta = 0) also steps upwards."""
        check_choice("sampler", sampler, SAMPLERS)
        if (sampler == "ddpm" and t_prev != t - 1) or (t_prev >= t and not (sampler == "ddim" and eta == 0)):
            raise ValueError(f"{sampler} cannot step from t={t} to t_prev={t_prev}")
        if (noise is not None) != self.needs_noise(sampler, t_prev, eta):
            raise ValueError(f"the {sampler} step {t} -> {t_prev} (eta={eta:g}) "
                             f"{'takes no' if noise is not None else 'needs'} noise")
        t_vec = self.timestep_batch(t, xt)
        x0, eps = self.predict_x0_eps(model_out, xt, t_vec, clip_x0)  # the one conversion every sampler uses
        if sampler == "ddpm":
            return StepOutput(self._ddpm_step(xt, x0, t_vec, noise), x0, None)
        if sampler == "ddim":
            return StepOutput(self._ddim_step(xt, x0, eps, t_vec, t_prev, eta, noise), x0, None)
        x_prev, state = self._dpmpp2m_step(xt, x0, t_vec, t_prev, state)
        return StepOutput(x_prev, x0, state)

    def _ddpm_step(self, xt, x0, t, noise):
        """[DDPM] Algorithm 2, line 4: x_{t-1} = mu~_t + sigma_t z, with the posterior mean mu~_t(x_t, x0)
        of Eqs. 6-7 written through x0 so that every objective shares it; the last step (t = 0) adds no
        noise. sigma_t^2 = beta~_t (fixed_small) or beta_t (fixed_large), [DDPM] Sec. 3.2."""
        mean, _ = self.q_posterior(x0, xt, t)
        if noise is None:
            return mean
        var = self.posterior_variance if self.var_type == "fixed_small" else self.betas
        return mean + self.gather(var, t, xt.ndim).sqrt() * noise

    def _ddim_step(self, xt, x0, eps, t, t_prev, eta, noise):
        """[DDIM] Eq. 12: x_{t_prev} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
        # 1. alpha-bar at both ends of the step (abar_prev = 1 at DATA_T)
        abar = self.gather(self.alphas_cumprod, t, xt.ndim)
        abar_prev = self.alpha_bar_prev(t_prev, xt)
        # 2. sigma_t(eta) of Eq. 16; eta = 1 gives the DDPM posterior std. Not evaluated at eta = 0, where
        #    the upward steps of DDIM inversion would give sqrt(< 0)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt() if eta > 0 else 0.0
        # 3. "predicted x0" term + "direction pointing to x_t" (clamped: eta > 1 puts sigma^2 above 1 - abar_prev)
        x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        # 4. "random noise" term; none on the last step, where sigma = 0
        return x_prev if noise is None else x_prev + sigma * noise

    def _dpmpp2m_step(self, xt, x0, t, t_prev, state):
        """[DPMS] Algorithm 2 (DPM-Solver++(2M)): x_{t_prev} = (sigma_prev / sigma_t) x_t
        - alpha_prev (e^{-h} - 1) D, in lambda = log(alpha / sigma). D is x0 on the first step and the
        second-order extrapolation (1 + 1/(2r)) x0 - 1/(2r) x0_last (r = h_last / h) after it; state
        carries (x0_last, h_last). The last step, to sigma = 0 (DATA_T), lands on x0 (first order)."""
        if t_prev < 0:
            return x0, state
        abar, abar_prev = self.gather(self.alphas_cumprod, t, xt.ndim), self.alpha_bar_prev(t_prev, xt)
        lam, lam_prev = (0.5 * torch.log(a / (1 - a)) for a in (abar, abar_prev))
        h = lam_prev - lam
        if state is None:
            d = x0
        else:
            x0_last, h_last = state  # 1/(2r) = h / (2 h_last)
            d = (1 + h / (2 * h_last)) * x0 - h / (2 * h_last) * x0_last
        ratio = ((1 - abar_prev) / (1 - abar)).sqrt()  # sigma_prev / sigma_t
        return ratio * xt - abar_prev.sqrt() * torch.expm1(-h) * d, (x0, h)

    def alpha_bar_prev(self, t_prev: int, x: torch.Tensor) -> torch.Tensor:
        """alpha-bar at a step's target t_prev, shaped (B, 1, ..., 1) like `gather`. t_prev < 0 (DATA_T) is
        "before step 0", the data itself: alpha-bar = 1, no noise ([DDIM] Eq. 12 defines alpha_0 := 1).
        Only alpha-bar has a value there, so this is not a case of `gather`."""
        if t_prev < 0:
            return torch.ones(x.shape[0], *[1] * (x.ndim - 1), device=x.device, dtype=self.alphas_cumprod.dtype)
        return self.gather(self.alphas_cumprod, self.timestep_batch(t_prev, x), x.ndim)

    # ------------------------------------------------------------------ for features (editing/, training/)
    @staticmethod
    def timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
        """Timestep t for every sample of the batch x, shape (B,) long on x's device, as the model and `gather`
        take it."""
        return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)

    def draw_noise(self, shape, generator: Optional[torch.Generator | NoiseSource] = None) -> torch.Tensor:
        """Standard normal noise of `shape` on the diffusion's device from `generator` (see `noise_source`)."""
        return noise_source(generator).randn(shape, self.betas.device)


def build_diffusion(cfg) -> Diffusion:
    """Diffusion from a full Config (uses cfg.diffusion)."""
    return Diffusion.from_config(cfg.diffusion)

