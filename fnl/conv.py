"""Factorized 2-d convolution, the paper's "spatial" split (paper section 2; docs/method.md#conv2d).

The kernel ``K`` (out, in, kh, kw) is read as the matrix ``M[(o, h), (i, w)]`` of size
(out*kh) x (in*kw) and held as ``M = U Vᵀ``. The forward pass is two convolutions:
a (1 x kw) conv from ``in`` to ``r`` channels with the horizontal stride/padding/dilation, then a
(kh x 1) conv from ``r`` to ``out`` channels with the vertical ones and the bias. When that costs
more multiply-adds than one dense conv (large or overcomplete ranks), the kernel ``U Vᵀ`` is
rebuilt and one conv runs instead; both paths compute the same function.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._kept import version_key
from .base import InitFn, LowRankLayer, check_positive_int, cuda_graph_capturing, resolve_rank

__all__ = ["FactorizedConv2d"]

_PATHS = ("auto", "factored", "dense")
IntPair = Union[int, Sequence[int]]


def _pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def set_conv_geometry(layer: nn.Module, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair,
                      padding: Union[IntPair, str], dilation: IntPair, groups: int, padding_mode: str, path: str,
                      string_padding: bool = True, why_groups: str = "") -> None:
    """Check a factorized conv's shape arguments and set them on ``layer``: one group, zero padding
    and a known ``path`` are all it supports; ``'valid'`` / ``'same'`` padding only with
    ``string_padding``."""
    name = type(layer).__name__
    layer.in_channels = check_positive_int("in_channels", in_channels)
    layer.out_channels = check_positive_int("out_channels", out_channels)
    layer.kernel_size = _pair("kernel_size", kernel_size, 1)
    layer.stride = _pair("stride", stride, 1)
    layer.dilation = _pair("dilation", dilation, 1)
    if isinstance(padding, str) and not string_padding:
        raise ValueError(f"padding must be an int or a pair of ints for {name}, got {padding!r}")
    layer.padding = _resolve_padding(padding, layer.kernel_size, layer.stride, layer.dilation)
    if groups != 1:
        raise ValueError(f"groups must be 1 for {name}{why_groups}, got {groups!r}")
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros' for {name}, got {padding_mode!r}")
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    layer.groups, layer.padding_mode, layer.path = 1, padding_mode, path


def _resolve_padding(padding: Union[IntPair, str], kernel_size: tuple[int, int], stride: tuple[int, int],
                     dilation: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError("padding='same' is supported only where it is symmetric "
                             f"(dilation*(kernel_size-1) even); got kernel_size={kernel_size}, "
                             f"dilation={dilation}")
        return totals[0] // 2, totals[1] // 2
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    return _pair("padding", padding, 0)


def conv_output_hw(layer: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Output (H, W) of a conv-like layer (``kernel_size``, ``stride``, ``padding``, ``dilation`` pairs;
    string padding: ``'same'`` keeps the size, ``'valid'`` is 0) for an input of shape (..., H, W)."""
    padding = layer.padding
    if isinstance(padding, str):
        if padding == "same":
            return input_shape[-2], input_shape[-1]
        padding = (0, 0)
    h, w = (_conv_out(size, k, s, p, d) for size, k, s, p, d in
            zip(input_shape[-2:], layer.kernel_size, layer.stride, padding, layer.dilation))
    return h, w


def conv_repr_options(layer: nn.Module) -> str:
    """The non-default padding / dilation / bias / path settings of a conv layer, for ``extra_repr``."""
    s = ""
    if layer.padding != (0, 0):
        s += f", padding={layer.padding}"
    if layer.dilation != (1, 1):
        s += f", dilation={layer.dilation}"
    if layer.bias is None:
        s += ", bias=False"
    if layer.path != "auto":
        s += f", path={layer.path!r}"
    return s


def is_channels_last(x: Tensor) -> bool:
    """Whether the 4-d ``x`` is laid out channels-last (and not also contiguous, as size-1 dims allow)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def keeps_inference_weights(conv: nn.Module) -> bool:
    """Whether weights made from ``conv``'s parameters in eager inference may be kept between calls
    (a plain attribute lookup: this runs on every call); :func:`fnl.keep_inference_weights` sets it."""
    return conv.__dict__.get("keep_inference_weights", True)


#: CPU capabilities (``torch.backends.cpu.get_cpu_capability()``) on which zero-padding the rank in
#: channels-last inference was measured faster: 1.04-1.10x for ``fnl_resnet20`` on an AVX2 CPU, where an
#: AVX-512 one ran 0.89-0.98x (docs/speed.md); elsewhere the rank stays bare
RANK_PAD_CPU_CAPABILITIES = ("AVX2",)


def default_cpu_inference_rank_align() -> int:
    """8 where this CPU's capability is one of :data:`RANK_PAD_CPU_CAPABILITIES`, else 0 (the default of
    :attr:`FactorizedConv2d.cpu_inference_rank_align`, read once at import)."""
    return 8 if torch.backends.cpu.get_cpu_capability() in RANK_PAD_CPU_CAPABILITIES else 0


def _laid_out(t: Tensor, channels_last: bool) -> Tensor:
    """The 4-d ``t`` itself if it has the canonical contiguous (or channels-last) strides, size-1 dims
    included, else a copy that has them.

    torch counts a tensor as contiguous whatever the stride of a size-1 dim, and ``.contiguous()``
    then returns it unchanged; the (out, r, 1, 1) view of ``U`` of a 1x1 or 1xk kernel is such a
    tensor, and as a conv weight it got wrong, run-to-run different weight gradients from the CPU
    conv backward (oneDNN on an AVX2 machine), and sent float16 backward on CUDA to a kernel that
    refuses it (docs/speed.md)."""
    n, c, h, w = t.shape
    if channels_last:
        want = [h * w * c, 1, w * c, c]
        fmt = torch.channels_last
    else:
        want = [c * h * w, h * w, w, 1]
        fmt = torch.contiguous_format
    if list(t.stride()) == want:
        return t
    return t.clone(memory_format=fmt)


class FactorizedConv2d(LowRankLayer):
    """A 2-d convolution whose kernel, as an (out*kh) x (in*kw) matrix, is ``U Vᵀ``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: (kh, kw) or an int.
        stride: as in ``nn.Conv2d``.
        padding: an int, a pair, ``'valid'``, or ``'same'`` (stride 1 and symmetric padding only).
        dilation: as in ``nn.Conv2d``.
        groups: must be 1 (the split of a grouped kernel is not implemented).
        bias: learn an additive bias.
        rank: the rank r, an int >= 1 (exactly one of rank / rank_scale).
        rank_scale: r = max(1, round(rank_scale * out_channels * kh)) (the paper's convention; it
            may exceed min(out*kh, in*kw)).
        square: add an (r x r) factor S initialised to the identity.
        spectral: initialise the dense kernel with ``init`` and factorize it by SVD.
        init: in-place init function; applied to the dense kernel (out, in, kh, kw) when
            ``spectral``, else (the paper's default-init baseline) to each factor as a matrix,
            as the paper's reference code does: to ``Vᵀ`` (r x in*kw, fan-in ``in*kw``) and to
            ``U`` (out*kh x r, fan-in ``r``). With Kaiming-normal at 64 -> 64 channels, 3x3,
            rank 21 that is std sqrt(2/192) for V and sqrt(2/21) for U. None is torch's
            ``nn.Conv2d`` init (Kaiming-uniform, a=sqrt(5)) with those fan-ins.
        path: ``'auto'`` (the cheaper of the two-conv and the rebuilt-kernel path, by
            multiply-adds), ``'factored'`` or ``'dense'``.
        padding_mode: only ``'zeros'``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    ``rank_align = 8`` (on a layer, or the class) runs the two convs on CUDA in 16-bit (a float16 /
    bfloat16 input, or autocast on) with the rank channels zero-padded up to a multiple of 8: cuDNN's
    tensor-core kernels want channel counts in multiples of 8 and otherwise pad the activations
    themselves on every call or take a generic kernel. The zero channels change no number. Off by
    default: on an H200 it made WRN-28-10 faster and ResNet-20 slower (docs/speed.md).

    ``cpu_inference_rank_align = 8`` (0 turns it off) does the same in eager float32 inference on a
    channels-last CPU input, where the padded weights are made once and kept. It is the default on an
    AVX2 CPU, where oneDNN ran the small convs faster at a multiple of 8 channels, and 0 elsewhere
    (slower on an AVX-512 CPU; docs/speed.md). Training, NCHW inputs, traces and compiled graphs keep
    the bare rank.
    """

    #: 0, or zero-pad the two convs' rank channels to a multiple of this on CUDA in 16-bit
    rank_align: int = 0
    #: device types on which the rank is padded (tests add 'cpu' to check the padded path)
    _rank_pad_devices: tuple = ("cuda",)
    #: 0, or zero-pad the rank channels to a multiple of this in eager float32 CPU inference on a
    #: channels-last input (8 on an AVX2 CPU, where oneDNN's kernels for 5-21 channels were faster at a
    #: multiple of 8; 0 elsewhere)
    cpu_inference_rank_align: int = default_cpu_inference_rank_align()

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: IntPair,
            stride: IntPair = 1,
            padding: Union[IntPair, str] = 0,
            dilation: IntPair = 1,
            groups: int = 1,
            bias: bool = True,
            *,
            rank: Optional[int] = None,
            rank_scale: Optional[float] = None,
            square: bool = False,
            spectral: bool = False,
            init: Optional[InitFn] = None,
            path: str = "auto",
            padding_mode: str = "zeros",
            device: Optional[torch.device | str] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                          padding_mode, path, why_groups=" (grouped kernels are not factorized)")
        kh, kw = self.kernel_size
        r = resolve_rank(rank, rank_scale, out_channels * kh)
        self.spectral = bool(spectral)
        self.init = init
        self._create_factors(out_channels * kh, in_channels * kw, r, bool(square), factory_kwargs)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def uses_dense_path(self) -> bool:
        """Whether forward runs one conv with the rebuilt kernel (set by ``path``)."""
        if self.path == "auto":
            (kh, kw), sh = self.kernel_size, self.stride[0]
            # per output pixel: the (1 x kw) conv runs on every input row (about sh per output row)
            factored = self.rank * (self.in_channels * kw * sh + self.out_channels * kh)
            return factored >= self.out_channels * self.in_channels * kh * kw
        return self.path == "dense"

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_dense_path:
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)
        w_a, w_b = self.conv_weights_for(x)
        return self.factored_convs(x, w_a, w_b, self.bias)

    def conv_weights_for(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two convs' weights, (r, in, 1, kw) and (out, r, kh, 1), for the input ``x``: in its
        memory format, and in eager inference made once and reused until a factor changes."""
        if torch.jit.is_scripting():
            return self._factor_conv_weights()
        # weights in the input's memory format: a channels-last conv otherwise re-lays out an NCHW
        # weight on every call (docs/speed.md), and the second weight is then a view of U, no copy
        channels_last = is_channels_last(x)
        pad = self.rank_padding_for(x)
        if self._keeps_weights_now():
            return self._cached_factor_conv_weights(channels_last, pad)
        return self._factor_conv_weights(channels_last, pad)

    def _keeps_weights_now(self) -> bool:
        """Eager inference, where the conv weights are made once and reused: not under autograd, and not
        in a trace, a compiled graph or a captured CUDA graph (those must read the parameters, so that
        their replays see in-place updates; docs/speed.md), unless turned off for this layer."""
        return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                    or cuda_graph_capturing() or not keeps_inference_weights(self))

    def rank_padding_for(self, x: Tensor) -> int:
        """Zero rank channels the two convs get for the input ``x``: with :attr:`rank_align` set, up to
        a multiple of it on CUDA in 16-bit (a float16 / bfloat16 input or autocast on); with
        :attr:`cpu_inference_rank_align` set, up to a multiple of that in eager float32 inference on
        a channels-last CPU input (the padded weights made once); else 0."""
        align = self.rank_align
        if align and x.device.type in self._rank_pad_devices and (
                x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(x.device.type)):
            return -self.rank % align
        align = self.cpu_inference_rank_align
        if (align and x.device.type == "cpu" and x.dtype == torch.float32 and is_channels_last(x)
                and not torch.is_autocast_enabled("cpu") and self._keeps_weights_now()):
            return -self.rank % align
        return 0

    def factored_convs(self, x: Tensor, w_a: Tensor, w_b: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The factored path with the given weights: the (1 x kw) conv with ``w_a`` and the horizontal
        stride / padding / dilation, then the (kh x 1) conv with ``w_b``, ``bias`` and the vertical ones."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        # A conv 1 wide along a strided, unpadded axis reads every s-th pixel: subsample, then stride 1.
        # The same numbers; and the CPU conv backward (oneDNN, AVX2) got the weight gradient of a
        # strided 1x1 conv on a channels-last input with 2-7 input channels wrong (docs/speed.md).
        if kw == 1 and sw > 1 and pw == 0:
            x, sw = x[:, :, :, ::sw], 1
        h = F.conv2d(x, w_a, None, (1, sw), (0, pw), (1, dw))  # (B, r, H, W_out)
        if kh == 1 and sh > 1 and ph == 0:
            h, sh = h[:, :, ::sh], 1
        return F.conv2d(h, w_b, bias, (sh, 1), (ph, 0), (dh, 1))  # (B, out, H_out, W_out)

    def _factor_conv_weights(self, channels_last: bool = False, pad: int = 0) -> tuple[Tensor, Tensor]:
        """The two convs' weights, (r, in, 1, kw) and (out, r, kh, 1), contiguous, or channels-last
        contiguous with ``channels_last`` (for a channels-last input); with ``pad``, r + pad rank
        channels, the added ones zero (the first conv's extra outputs are zero and the second
        conv's extra inputs have zero weights, so the result is the same).

        Permuted views of ``V`` and ``U`` are not contiguous, and the conv kernels copy such a weight
        on every call anyway; here the copy is explicit, and without autograd it is made once and
        reused until a factor changes (``_cached_factor_conv_weights``). ``U``'s (out*kh, r) rows are
        already the channels-last layout of the second weight, so that one is a view.
        """
        (kh, kw), r = self.kernel_size, self.rank
        u = self.U if self.S is None else self.U @ self.S  # (out*kh, r)
        w_a = self.V.view(self.in_channels, kw, 1, r).permute(3, 0, 2, 1)  # (r, in, 1, kw)
        # (out, r, kh, 1): a view with the canonical channels-last strides
        w_b = u.view(self.out_channels, kh, 1, r).permute(0, 3, 1, 2)
        if pad:  # one padded copy each, in place of the copies below
            w_a, w_b = F.pad(w_a, (0, 0, 0, 0, 0, 0, 0, pad)), F.pad(w_b, (0, 0, 0, 0, 0, pad))
        return _laid_out(w_a, channels_last), _laid_out(w_b, channels_last)

    @torch.jit.unused
    def _cached_factor_conv_weights(self, channels_last: bool = False, pad: int = 0) -> tuple[Tensor, Tensor]:
        # host-side key, no device sync (fnl._kept): in-place updates, optimizer steps, replaced, moved or
        # cast factors; and autocast, under which U @ S (square) is made in its lower precision
        key = version_key(self.factor_parameters())
        if key is None:  # inference tensors: nothing to key on
            return self._factor_conv_weights(channels_last, pad)
        device = self.U.device.type
        autocast = (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
                    and torch.get_autocast_dtype(device))
        key += (channels_last, pad, autocast)
        cache = self.__dict__.get("_conv_weight_cache")
        if cache is None or cache[0] != key:
            cache = (key, self._factor_conv_weights(channels_last, pad))
            self.__dict__["_conv_weight_cache"] = cache
        return cache[1]

    def __getstate__(self) -> dict:
        # the kept weights stay behind: a copy or a pickle makes its own (their key holds weak references)
        state = super().__getstate__()
        state.pop("_conv_weight_cache", None)
        return state

    # --- layout --------------------------------------------------------------------------------
    def _dense_weight_shape(self) -> Sequence[int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _matrix_from_weight(self, weight: Tensor) -> Tensor:
        # (out, in, kh, kw) -> (out, kh, in, kw) -> (out*kh, in*kw): the matrix the forward pass uses
        kh, kw = self.kernel_size
        return weight.permute(0, 2, 1, 3).reshape(self.out_channels * kh, self.in_channels * kw)

    def _weight_from_matrix(self, matrix: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        return matrix.view(self.out_channels, kh, self.in_channels, kw).permute(0, 2, 1, 3)

    def _dense_fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def _torch_default_init_(self, weight: Tensor) -> None:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def _default_init_(self) -> None:
        # The reference's scheme for the default-init baseline: the init on the factor matrices Vᵀ
        # (r x in*kw) and U (out*kh x r), so U's fan-in is r. (U as the (out, r, kh, 1) weight of
        # the second conv would have fan-in r*kh, a sqrt(kh) smaller std than the paper's runs.)
        init = self.init or self._torch_default_init_
        init(self.V.T)
        init(self.U)

    # --- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, layer: nn.Conv2d, *, rank: Optional[int] = None, rank_scale: Optional[float] = None,
                   square: bool = False, path: str = "auto") -> "FactorizedConv2d":
        """Spectral factorisation of a (trained) ``nn.Conv2d``: the best rank-r approximation."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer must be an nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"layer.groups must be 1 for FactorizedConv2d, got {layer.groups}")
        if layer.padding_mode != "zeros":
            raise ValueError(f"layer.padding_mode must be 'zeros' for FactorizedConv2d, got {layer.padding_mode!r}")
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, 1, layer.bias is not None, rank=rank, rank_scale=rank_scale, square=square,
                  path=path, device=w.device, dtype=w.dtype)
        new.set_from_weight_(w)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        return new

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, 1, self.bias is not None, device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def inference_form(self) -> nn.Module:
        """The two plain convs of the forward pass, (1 x kw) then (kh x 1), with contiguous weights;
        the dense ``nn.Conv2d`` when forward takes the rebuilt-kernel path (``uses_dense_path``)."""
        if self.uses_dense_path:
            return self.to_dense().train(self.training)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        r, dev, dtype = self.rank, self.U.device, self.U.dtype
        first = nn.Conv2d(self.in_channels, r, (1, kw), (1, sw), (0, pw), (1, dw), bias=False, device=dev,
                          dtype=dtype)
        second = nn.Conv2d(r, self.out_channels, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=self.bias is not None,
                           device=dev, dtype=dtype)
        with torch.no_grad():
            w_a, w_b = self._factor_conv_weights()
            first.weight.copy_(w_a)
            second.weight.copy_(w_b)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        return nn.Sequential(first, second).train(self.training)

    # --- counts --------------------------------------------------------------------------------
    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds for one sample of shape (in_channels, H, W), on the path forward takes."""
        if self.uses_dense_path:
            return self.dense_macs(input_shape)
        (kh, kw), r = self.kernel_size, self.rank
        h_out, w_out = conv_output_hw(self, input_shape)
        return r * self.in_channels * kw * input_shape[-2] * w_out + self.out_channels * r * kh * h_out * w_out

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds of the dense conv for the same input."""
        h_out, w_out = conv_output_hw(self, input_shape)
        return self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1] * h_out * w_out

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, {self._extra_repr_common()}")
        return s + conv_repr_options(self)
