"""Gradient-method helpers shared by the step and benchmark tests: a method written against refl.step's
public contract alone, registering methods for one test, and counting UNet calls."""

import contextlib

import torch

from refl.step import GRAD_METHODS, MethodResult, StepContext, register_grad_method


def last_step(ctx: StepContext, latents) -> MethodResult:
    """Sample to the last step without gradient, then one call with gradient and its x0."""
    t = ctx.timesteps[-1]
    latents = ctx.run_no_grad(latents, ctx.timesteps[:-1])
    eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
    return MethodResult([ctx.step(eps, t, latents).pred_original_sample], len(ctx.timesteps) - 1)


@contextlib.contextmanager
def registering():
    """register(name, method) inside; the methods registered through it are gone afterwards."""
    names = []

    def register(name, method):
        register_grad_method(name, method)
        names.append(name)
        return method

    try:
        yield register
    finally:
        for name in names:
            GRAD_METHODS.pop(name, None)


def unet_calls(components):
    """(list that every UNet forward appends torch.is_grad_enabled() to, the hook's handle)."""
    calls = []
    handle = components.unet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    return calls, handle
