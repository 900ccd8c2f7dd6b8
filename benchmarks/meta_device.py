"""An update run on PyTorch's meta device (tensors with shapes and dtypes, no data), stored as a CUDA run
would store it, for the memory model of models that do not fit this machine (SD 3.5 large, FLUX.1-dev):
every op runs, so the bytes of every tensor alive and every op's FLOPs are counted exactly, in no time and
no memory. Three things a meta run lacks are supplied here:

- CUDA's autocast (`CudaAutocastOnMeta`): meta tensors have no autocast of their own, so the region where
  `SDComponents.autocast` has CPU autocast on is where this mode casts as CUDA's autocast does (its op
  lists: matmuls, convolutions and attention in the autocast dtype; norms, softmax, exp, pow, sums,
  interpolation and the losses in fp32, at the functions the models call);
- CUDA's attention kernel: `scaled_dot_product_attention` on meta tensors runs torch's math fallback, which
  stores the attention matrix; here it runs the flash kernel's op (bf16 on an H100: flash attention, which
  stores the output and its log-sum-exp);
- the values of the few small tensors an update reads back (`MetaValues`): a timestep's index in the
  schedule, `.item()` of a drawn cut, the finite-loss check. Small tensors made from known values keep a
  CPU copy that every op on them updates; only what depends on the large tensors stays unknown, and the
  one such read-back an update makes (is the loss finite?) answers yes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
Tensor = torch.Tensor

# CUDA autocast's lists (torch's "Autocast Op Reference"), at the functions the models call.
LOWER_PRECISION = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.prelu, F.scaled_dot_product_attention, torch.matmul, Tensor.matmul, Tensor.__matmul__,
    Tensor.__rmatmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm, torch.baddbmm, Tensor.baddbmm,
    torch.addmm, Tensor.addmm, torch.addbmm, torch.einsum, torch.mv, torch.addmv,
}
FP32 = {
    F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm, F.interpolate, F.mse_loss, F.l1_loss,
    F.smooth_l1_loss, F.softplus, F.normalize, F.cosine_similarity, torch.exp, Tensor.exp, torch.log,
    Tensor.log, torch.rsqrt, Tensor.rsqrt, torch.pow, Tensor.pow, Tensor.__pow__, Tensor.__rpow__,
    Tensor.__rtruediv__, torch.expm1, torch.log1p, torch.reciprocal, Tensor.reciprocal, torch.norm,
    Tensor.norm, torch.linalg.vector_norm, torch.cdist, torch.logsumexp, Tensor.logsumexp, torch.erfinv,
}
# fp32 by a dtype argument when none is given (the input is not copied)
FP32_BY_DTYPE = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, Tensor.softmax,
                 Tensor.log_softmax, torch.sum, Tensor.sum, torch.cumsum, Tensor.cumsum, torch.prod,
                 Tensor.prod}


def _tensors(args, kwargs) -> list[Tensor]:
    """The tensors among the arguments of a call, and in its lists and tuples (tree_flatten costs half of a
    meta run's time)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, Tensor))
    return found


def _has_meta(args, kwargs) -> bool:
    return any(t.is_meta for t in _tensors(args, kwargs))


def _cast(tree, dtype: torch.dtype):
    """Floating-point meta tensors (not float64) of `tree` in `dtype`, as autocast casts its device's."""
    def cast(t):
        if isinstance(t, Tensor) and t.is_meta and t.is_floating_point() and t.dtype not in (dtype,
                                                                                              torch.float64):
            return t.to(dtype)
        return t
    return tree_map(cast, tree)


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """CUDA's attention on meta tensors: the flash kernel's op without a mask, the memory-efficient one with
    (both store the output and its log-sum-exp, not the attention matrix)."""
    q, k, v = query, key, value
    if enable_gqa or q.dim() != 4:
        return None
    if attn_mask is None:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
        attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    return aten._scaled_dot_product_efficient_attention(q, k, v, bias.expand(q.shape[0], q.shape[1],
                                                                             q.shape[2], k.shape[2]),
                                                        True, dropout_p, is_causal, scale=scale)[0]


def backward_with_mode_on(mode: TorchFunctionMode, args: tuple, kwargs: dict) -> bool:
    """Run `torch.autograd.backward(loss)` of a scalar loss (the benchmarks' update) with `mode` entered:
    a mode is off inside its own handler, yet the forwards that activation checkpointing reruns in backward
    must pass through it too. False (nothing run) for any other call of backward."""
    if len(args) != 1 or any(kwargs.values()):
        return False
    (loss,) = args[0] if isinstance(args[0], (tuple, list)) else args
    with mode:
        torch.autograd.graph._engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                                                  allow_unreachable=True, accumulate_grad=True)
    return True


class CudaAutocastOnMeta(TorchFunctionMode):
    """CUDA's autocast for meta tensors where CPU autocast is on (see the module docstring), and CUDA's
    attention kernel for them everywhere."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.autograd.backward and backward_with_mode_on(self, args, kwargs):
            return None  # the forwards that checkpointing reruns in backward are cast too
        if not _has_meta(args, kwargs):
            return func(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            if func in LOWER_PRECISION:
                args, kwargs = _cast((args, kwargs), dtype)
            elif func in FP32:
                args, kwargs = _cast((args, kwargs), torch.float32)
            elif func in FP32_BY_DTYPE and kwargs.get("dtype") is None and args[0].dtype in (torch.float16,
                                                                                             torch.bfloat16):
                kwargs = {**kwargs, "dtype": torch.float32}
        with torch.autocast("cpu", enabled=False):
            if func is F.scaled_dot_product_attention:
                out = _flash_attention(*args, **kwargs)
                if out is not None:
                    return out
            return func(*args, **kwargs)


class UnknownValueError(RuntimeError):
    """A meta tensor's value was read that depends on data a meta run does not have."""


class MetaValues(TorchDispatchMode):
    """The values of small meta tensors made from known values (see the module docstring). Enter it below the
    counting modes (first), so they do not count the CPU copies."""

    MAX_NUMEL = 1 << 16  # tensors larger than this never get a copy (the model's own tensors are)

    def __init__(self):
        super().__init__()
        self.values = WeakIdKeyDictionary()  # meta tensor -> its CPU copy
        self.assumed_true = 0  # read-backs of unknown booleans answered True

    def _known(self, t) -> bool:
        return not isinstance(t, Tensor) or not t.is_meta or t in self.values

    def _real(self, t):
        return self.values[t] if isinstance(t, Tensor) and t.is_meta else t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        known = all(self._known(t) for t in tensors)
        if func is aten._local_scalar_dense.default and tensors[0].is_meta:
            if known:
                return self._real(tensors[0]).item()
            if tensors[0].dtype == torch.bool:
                self.assumed_true += 1
                return True
            raise UnknownValueError(f"{func} of a meta tensor whose value depends on the model's tensors")
        if func is aten.nonzero.default and tensors[0].is_meta:
            if not known:
                raise UnknownValueError("nonzero() of a meta tensor whose value depends on the model's "
                                        "tensors")
            real = self._real(tensors[0]).nonzero()
            out = real.to("meta")
            self.values[out] = real
            return out
        out = func(*args, **kwargs)
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(t, Tensor) and t.is_meta]
        mutated = [t for t in tensors if t.is_meta and t in self.values] if func._schema.is_mutable else []
        if not outs and not mutated:
            return out
        if known and all(t.numel() <= self.MAX_NUMEL for t in outs + mutated):
            real_args, real_kwargs = tree_map(self._real, (args, kwargs))
            if "device" in real_kwargs:  # factories and copies onto the meta device: their CPU twin
                real_kwargs["device"] = torch.device("cpu")
            real = func(*real_args, **real_kwargs)
            flat, real_flat = tree_flatten(out)[0], tree_flatten(real)[0]
            if len(real_flat) == len(flat):
                for o, r in zip(flat, real_flat):
                    if isinstance(o, Tensor) and o.is_meta and isinstance(r, Tensor):
                        self.values[o] = r
        else:
            for t in mutated:  # written with unknown values: no longer known
                del self.values[t]
        return out
