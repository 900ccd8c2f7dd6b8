"""The preference objectives on per-example denoising errors, and the implicit reward they share.

The tuned model's denoising error on an image x at timestep t with noise eps, e = mean over the latent's
elements of (prediction - target)^2 (target: eps, or v for v-prediction models), against the reference
(base) model's error r on the same x, t, eps gives the implicit reward

    reward(x) = -(beta / 2) * (e - r)

(positive where the tuned model denoises x better than the base does). For Gaussian diffusion the log
likelihood ratio of the tuned and the base model on one denoising step is, up to a timestep weight, minus
the difference of these squared errors over twice the noise variance: Diffusion-DPO's and Diffusion-KTO's
stand-in for log(p_theta(x) / p_ref(x)).

Scaling: the Diffusion-DPO paper (Wallace et al., 2023, eq. 14) writes the exponent as
-beta * T * omega(lambda_t) * (...) with squared norms summed over the latent's D elements; its released
training code uses -(beta / 2) * (...) with per-element means, and the default beta = 5000 (its SD 1.5 and
SDXL runs) belongs to that form. We use the code's form, so that default means what it meant there; the
paper's beta_paper = beta / (2 * T * D) with omega = 1 (T = 1000 steps; D = 4 * 64 * 64 for SD 1.5 at 512 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_reward(errors: torch.Tensor, ref_errors: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) tuned and reference denoising errors -> (B,) implicit rewards -(beta / 2) (e - r)."""
    return -0.5 * beta * (errors - ref_errors)  # (B,)


def dpo_loss(e_w: torch.Tensor, e_l: torch.Tensor, r_w: torch.Tensor, r_l: torch.Tensor, beta: float,
             label: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Diffusion-DPO on B pairs: (B,) errors of the tuned model (e) and the reference (r) on the preferred
    (w) and the rejected (l) image of each pair, all four at one shared timestep and noise per pair.

        z = reward(x_w) - reward(x_l) = -(beta / 2) * ((e_w - r_w) - (e_l - r_l))
        loss = mean over pairs of -log sigmoid(z)

    The mean over the batch is taken outside the log-sigmoid, per pair (averaging z first, inside, would
    be a different objective: the bug of diffusers issue #6702). `label` (B,), the probability that w is
    preferred (1 for a clear pair, 0.5 for a kept tie), makes the loss -label log sigmoid(z) - (1 - label)
    log sigmoid(-z); `weight` (B,) scales each pair's term (a tie kept at half weight). Returns the loss
    and, detached, what is logged: accuracy (share of pairs with z > 0), the mean margin z, the rewards."""
    reward_w = implicit_reward(e_w, r_w, beta)  # (B,)
    reward_l = implicit_reward(e_l, r_l, beta)  # (B,)
    z = reward_w - reward_l  # (B,)
    per_pair = -F.logsigmoid(z)  # (B,)
    if label is not None:
        per_pair = -(label * F.logsigmoid(z) + (1 - label) * F.logsigmoid(-z))  # (B,)
    if weight is not None:
        per_pair = per_pair * weight  # (B,)
    return {"loss": per_pair.mean(), "accuracy": (z > 0).float().mean().detach(), "margin": z.mean().detach(),
            "reward_preferred": reward_w.mean().detach(), "reward_rejected": reward_l.mean().detach(),
            "error_preferred": e_w.mean().detach(), "error_rejected": e_l.mean().detach()}


def kto_reference_point(kl_sum: torch.Tensor, kl_count: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean implicit reward of mismatched (image, prompt) pairs): an
    estimate of the KL divergence of the tuned model from the reference, from sums that the caller may have
    added up over processes. Detached: KTO does not back-propagate through it."""
    return (kl_sum / kl_count.clamp(min=1)).clamp(min=0).detach()


def kto_loss(errors: torch.Tensor, ref_errors: torch.Tensor, liked: torch.Tensor, z0: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Diffusion-KTO on B single images with labels `liked` (B,) (1 liked, 0 not), at one timestep and
    noise each: with the implicit reward r = -(beta / 2) (e - e_ref) and the reference point z0
    (`kto_reference_point`),

        liked:      lambda_D * (1 - sigmoid(r - z0))
        not liked:  lambda_U * (1 - sigmoid(z0 - r))
        loss = mean over the B images

    (KTO's value function: the loss is lambda_y minus the value). The KTO paper advises
    lambda_D * n_liked / (lambda_U * n_not_liked) in [1, 4/3]. Returns the loss and, detached, what is
    logged: the mean reward of the liked and of the not-liked images (0 where there are none), z0."""
    reward = implicit_reward(errors, ref_errors, beta)  # (B,)
    liked = liked.float()  # (B,)
    value = liked * desirable_weight * torch.sigmoid(reward - z0) + (1 - liked) * undesirable_weight * \
        torch.sigmoid(z0 - reward)  # (B,)
    per_image = liked * desirable_weight + (1 - liked) * undesirable_weight - value  # (B,)
    if weight is not None:
        per_image = per_image * weight  # (B,)
    n_liked, n_not = liked.sum(), (1 - liked).sum()
    return {"loss": per_image.mean(),
            "reward_liked": ((reward * liked).sum() / n_liked.clamp(min=1)).detach(),
            "reward_not_liked": ((reward * (1 - liked)).sum() / n_not.clamp(min=1)).detach(),
            "reference_point": z0.detach(), "liked_fraction": liked.mean().detach()}
