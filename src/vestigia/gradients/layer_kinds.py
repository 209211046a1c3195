"""Which layers have Kronecker-factored per-example gradients, and how to read them.

For a supported layer the pre-activation output is linear in its kernel,
`z_t = W^T a_t (+ b)` at each position `t` (a sequence step, an image location), so the
per-example gradient of the kernel (and bias) is

    G_i = sum_t a_it d_it^T,        shape (in, out),

with `a_it` the layer input at `t` (a trailing 1 when the bias is watched) and
`d_it = d l_i / d z_it` the gradient of the example's loss w.r.t. the pre-activation output.
Each `LayerSpec` says how to compute `z` from the layer's input and how to lay `a` and `d` out
as `(batch, T, in)` and `(batch, T, out)`:

* `Dense`: `a` the input (leading axes after the batch are positions);
* `EinsumDense`: the input with kernel-contracted axes flattened to `in` and shared axes as
  positions (so the projections of `MultiHeadAttention` are covered);
* `Conv1D` / `Conv2D` (`channels_last`, `groups=1`): `a` the unfolded patches,
  `(kh * kw * c_in)` per output location, for any strides, dilation and `same` / `valid` /
  `causal` padding;
* `Embedding`: `a` the one-hot token (`in = vocabulary`; its input factor is diagonal).

`G` reshaped to `(in, out)` and permuted by `kernel_axes` is the kernel's gradient; its last row
is the bias's when `has_bias`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

KINDS = ("dense", "einsum_dense", "conv", "embedding")


@dataclass(frozen=True)
class LayerSpec:
    """A watched layer whose kernel gradient is `sum_t a_t d_t^T`.

    Attributes:
        layer: the Keras layer.
        kind: one of `KINDS`.
        kernel: its kernel variable; bias: its bias variable when watched, else None.
        n_in: rows of `G` (input width, +1 with a bias); n_out: columns of `G`.
        kernel_axes: permutation taking `G[:kernel_in]` reshaped to `in_dims + out_dims` back to
            the kernel's axis order (identity except for some `EinsumDense` equations).
        equation: for `EinsumDense`, `(input, kernel, output)` subscripts.
    """

    layer: keras.layers.Layer
    kind: str
    kernel: Any
    bias: Any
    n_in: int
    n_out: int
    kernel_axes: tuple[int, ...]
    equation: tuple[str, str, str] | None = None

    @property
    def name(self) -> str:
        return str(self.layer.path if hasattr(self.layer, "path") else self.layer.name)

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def variables(self) -> list[Any]:
        return [self.kernel] + ([self.bias] if self.bias is not None else [])

    @property
    def diagonal_input(self) -> bool:
        """True for `Embedding`: one-hot inputs make the input factor diagonal."""
        return self.kind == "embedding"

    def preactivation(self, inputs: tf.Tensor) -> tf.Tensor:
        """`z`, the layer's output before its activation, computed from its input."""
        layer, kernel = self.layer, self.kernel.value
        if self.kind == "embedding":
            return tf.gather(kernel, tf.cast(inputs, tf.int32))
        if self.kind == "dense":
            z = tf.tensordot(inputs, kernel, axes=[[inputs.shape.rank - 1], [0]])
        elif self.kind == "einsum_dense":
            z = tf.einsum(layer.equation, inputs, kernel)
        else:
            padding = layer.padding
            if padding == "causal":
                inputs = tf.pad(inputs, [[0, 0], [layer.dilation_rate[0] * (layer.kernel_size[0] - 1), 0], [0, 0]])
                padding = "valid"
            z = keras.ops.conv(inputs, kernel, list(layer.strides), padding, "channels_last", layer.dilation_rate)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            z = z + bias.value
        return z

    def activation(self, z: tf.Tensor) -> tf.Tensor:
        fn = getattr(self.layer, "activation", None)
        return z if fn is None else fn(z)

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        """`a`, shape `(batch, T, n_in)` (the bias's trailing 1 included), float32."""
        batch = tf.shape(inputs)[0]
        if self.kind == "embedding":
            a = tf.one_hot(tf.reshape(tf.cast(inputs, tf.int32), [batch, -1]), self.n_in, dtype=tf.float32)
        elif self.kind == "dense":
            a = _as_rows(inputs, inputs.shape[-1])
        elif self.equation is not None:
            a = self._einsum_rows(inputs, self.equation[0], _kernel_dims(self.equation, "in"))
        elif _shifted_patches_apply(self.layer):
            return _shifted_patches(self.layer, tf.cast(inputs, tf.float32), self.has_bias)
        else:
            a = _patches(self.layer, inputs)
        a = tf.cast(a, tf.float32)
        if self.has_bias:
            a = tf.concat([a, tf.ones_like(a[:, :, :1])], axis=2)
        return a

    def output_rows(self, delta: tf.Tensor) -> tf.Tensor:
        """`d`, the gradient w.r.t. `z`, laid out `(batch, T, n_out)` to match `input_rows`."""
        if self.equation is not None:
            return self._einsum_rows(delta, self.equation[2], _kernel_dims(self.equation, "out"))
        return _as_rows(delta, delta.shape[-1])

    def _einsum_rows(self, tensor: tf.Tensor, subscripts: str, kernel_dims: str) -> tf.Tensor:
        assert self.equation is not None
        inputs, kernel, _ = self.equation
        count = tensor.shape.rank - (len(subscripts) - 3 if "..." in subscripts else len(subscripts))
        expanded = _expand_ellipsis(subscripts, count)
        positions = [c for c in _expand_ellipsis(inputs, count)[1:] if c not in kernel]
        order = [expanded[0]] + positions + list(kernel_dims)
        moved = tf.transpose(tensor, [expanded.index(c) for c in order])
        width = int(np.prod([tensor.shape[expanded.index(c)] for c in kernel_dims]))
        return _as_rows(moved, width)

    def kernel_gradient(self, gradient: tf.Tensor) -> list[tf.Tensor]:
        """Split `G` `(batch, n_in, n_out)` into the variables' per-example gradients, flattened."""
        batch = tf.shape(gradient)[0]
        kernel_in = self.n_in - int(self.has_bias)
        kernel = gradient[:, :kernel_in, :]
        if self.kernel_axes != tuple(range(len(self.kernel_axes))):
            shape = [batch] + self._grouped_kernel_shape()
            kernel = tf.transpose(tf.reshape(kernel, shape), [0] + [1 + i for i in self.kernel_axes])
        parts = [tf.reshape(kernel, [batch, -1])]
        if self.has_bias:
            parts.append(gradient[:, kernel_in, :])
        return parts

    def _grouped_kernel_shape(self) -> list[int]:
        assert self.equation is not None
        shape = dict(zip(self.equation[1], self.kernel.shape))
        return [int(shape[c]) for c in _kernel_dims(self.equation, "in") + _kernel_dims(self.equation, "out")]


def _as_rows(tensor: tf.Tensor, width: int) -> tf.Tensor:
    """`tensor` `(batch, ...)` as `(batch, T, width)`, with `T` static whenever the non-batch axes
    are (traced code decides contraction orders from it, see `kronecker_factors.rotate_first`)."""
    rest = tensor.shape[1:]
    positions = int(np.prod(rest)) // int(width) if rest.is_fully_defined() else -1
    return tf.reshape(tensor, [tf.shape(tensor)[0], positions, width])


def _expand_ellipsis(subscripts: str, count: int) -> str:
    """Replace `...` by `count` named axes (Greek letters: never in a Keras equation)."""
    if "..." not in subscripts:
        return subscripts
    head, tail = subscripts.split("...")
    return head + "".join(chr(0x3B1 + i) for i in range(count)) + tail


def _kernel_dims(equation: tuple[str, str, str], side: str) -> str:
    inputs, kernel, outputs = equation
    other = inputs if side == "in" else outputs
    return "".join(c for c in kernel if c in other)


def _parse_einsum(layer: Any) -> tuple[str, str, str] | None:
    """`(input, kernel, output)` subscripts if every kernel axis is contracted with the input or
    carried to the output (not both), the batch axis comes first, and input and output share
    only the batch and position axes; else None."""
    left, outputs = layer.equation.replace(" ", "").split("->")
    inputs, kernel = left.split(",")
    if "..." in kernel or ("..." in inputs) != ("..." in outputs):
        return None
    if "..." in inputs and not (inputs.startswith("...") and outputs.startswith("...")):
        return None
    ins, outs = _expand_ellipsis(inputs, 1), _expand_ellipsis(outputs, 1)
    if "..." in inputs:  # a leading ellipsis holds the batch axis: give it a name of its own
        ins, outs = "\u03c9" + ins, "\u03c9" + outs
        inputs, outputs = "\u03c9" + inputs, "\u03c9" + outputs
    if ins[0] != outs[0] or ins[0] in kernel:
        return None
    for c in kernel:
        if (c in ins) == (c in outs):
            return None
    for c in ins:
        if c not in kernel and c not in outs:
            return None
    for c in outs:
        if c not in kernel and c not in ins:
            return None
    return inputs, kernel, outputs


def _shifted_patches_apply(layer: Any) -> bool:
    return (
        layer.rank == 2
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.padding in ("same", "valid")
    )


def _shifted_patches(layer: Any, inputs: tf.Tensor, bias: bool) -> tf.Tensor:
    """The patches of a stride-1 `Conv2D` (with the bias's 1 when `bias`), `(batch, T, n_in)`, as
    one concatenation of shifted slices of the padded input (about twice as fast as
    `extract_patches` on CPU, and no second copy for the bias column)."""
    kh, kw = (int(k) for k in layer.kernel_size)
    if layer.padding == "same":  # TensorFlow's split: the odd pixel after
        pad_h, pad_w = ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)
        inputs = tf.pad(inputs, [[0, 0], list(pad_h), list(pad_w), [0, 0]])
    out_h, out_w = int(inputs.shape[1]) - kh + 1, int(inputs.shape[2]) - kw + 1
    parts = [inputs[:, u : u + out_h, v : v + out_w, :] for u in range(kh) for v in range(kw)]
    if bias:
        parts.append(tf.ones_like(inputs[:, :out_h, :out_w, :1]))
    patches = tf.concat(parts, axis=3)
    return _as_rows(patches, patches.shape[-1])


def _patches(layer: Any, inputs: tf.Tensor) -> tf.Tensor:
    """Unfolded convolution patches `(batch, locations, k_h * k_w * c_in)` in the kernel's order."""
    if layer.rank == 1:
        inputs = inputs[:, None, :, :]
        sizes, strides, rates = (
            (1,) + tuple(layer.kernel_size),
            (1,) + tuple(layer.strides),
            (1,) + tuple(layer.dilation_rate),
        )
    else:
        sizes, strides, rates = tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate)
    padding = layer.padding.upper()
    if padding == "CAUSAL":
        pad = rates[1] * (sizes[1] - 1)
        inputs = tf.pad(inputs, [[0, 0], [0, 0], [pad, 0], [0, 0]])
        padding = "VALID"
    patches = tf.image.extract_patches(
        inputs, sizes=(1, *sizes, 1), strides=(1, *strides, 1), rates=(1, *rates, 1), padding=padding
    )
    return _as_rows(patches, patches.shape[-1])


def _plain(layer: Any) -> bool:
    return not getattr(layer, "lora_enabled", False) and getattr(layer, "quantization_mode", None) is None


def layer_spec(layer: Any, watched: set[int]) -> tuple[LayerSpec | None, str]:
    """The `LayerSpec` of `layer` if its watched kernel is Kronecker-factorable, else
    `(None, reason)`. `watched` holds the `id`s of the watched variables."""
    kernel = getattr(layer, "embeddings", None) if isinstance(layer, keras.layers.Embedding) else None
    kernel = kernel if kernel is not None else getattr(layer, "kernel", None)
    if kernel is None or id(kernel) not in watched:
        return None, "its kernel is not watched"
    if not _plain(layer):
        return None, "LoRA or quantized layers are not supported"
    bias = getattr(layer, "bias", None)
    bias = bias if bias is not None and id(bias) in watched else None
    kernel_shape = tuple(int(s) for s in kernel.shape)
    identity = tuple(range(len(kernel_shape)))
    if type(layer) is keras.layers.Embedding:
        return LayerSpec(layer, "embedding", kernel, None, kernel_shape[0], kernel_shape[1], identity), ""
    if type(layer) is keras.layers.Dense:
        return LayerSpec(
            layer, "dense", kernel, bias, kernel_shape[0] + (bias is not None), kernel_shape[1], identity
        ), ""
    if type(layer) is keras.layers.EinsumDense:
        equation = _parse_einsum(layer)
        if equation is None:
            return None, f"its equation {layer.equation!r} does not split into input and output axes"
        dims = dict(zip(equation[1], kernel_shape))
        in_dims, out_dims = _kernel_dims(equation, "in"), _kernel_dims(equation, "out")
        if bias is not None and (layer.bias_axes or "") != out_dims:
            return None, f"its bias axes {layer.bias_axes!r} differ from the kernel's output axes {out_dims!r}"
        grouped = in_dims + out_dims
        axes = tuple(grouped.index(c) for c in equation[1])
        n_in, n_out = int(np.prod([dims[c] for c in in_dims])), int(np.prod([dims[c] for c in out_dims]))
        return LayerSpec(layer, "einsum_dense", kernel, bias, n_in + (bias is not None), n_out, axes, equation), ""
    if type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D):
        if layer.data_format != "channels_last" or layer.groups != 1:
            return None, "only channels_last convolutions with groups=1 are supported"
        n_in = int(np.prod(kernel_shape[:-1]))
        return LayerSpec(layer, "conv", kernel, bias, n_in + (bias is not None), kernel_shape[-1], identity), ""
    return None, f"{type(layer).__name__} layers are not supported"
